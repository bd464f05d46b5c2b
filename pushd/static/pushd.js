/**
 * pushd.js — the browser client of pushd. No dependencies, one ES module.
 *
 *   import { PushdClient } from "/pushd.js";      // or: import PushdClient from "/pushd.js"
 *
 *   const client = new PushdClient();             // the page's origin; or { url: "https://push.example.com" }
 *   client.on("state", (state) => console.log("pushd is", state));
 *   const stop = client.subscribe("news", (data, message) => console.log(message.id, data));
 *   await client.publish("news", { hello: "world" });   // needs a token with a publish grant
 *   stop();                                        // or client.unsubscribe("news")
 *
 * Options (all optional):
 *   url            base URL of pushd: "https://host[:port][/prefix]" (ws:// and wss:// work too);
 *                  default: the page's origin. The client uses <url>/ws, <url>/sse and
 *                  <url>/channels/{channel}.
 *   token          a subscriber token (a JWT string), or a function returning one (or a Promise
 *                  of one). A function is called before EVERY connection attempt, so it is the
 *                  place to refresh an expiring token. Sent as ?token= (browsers cannot set
 *                  headers on a WebSocket or an EventSource).
 *   transport      "auto" (default): WebSocket, falling back to SSE (see below);
 *                  "websocket": WebSocket only; "sse": Server-Sent Events only.
 *   fallbackAfter  WebSocket handshakes that must fail in a row, with the WebSocket never having
 *                  opened, before "auto" switches to SSE for good (default 3).
 *   minDelay, maxDelay   reconnect backoff bounds in ms (default 500 and 15000).
 *   pingInterval   ms between the client's own `ping` frames on a WebSocket (default 25000;
 *                  0: off); pingTimeout: ms to wait for the `pong` before the connection is
 *                  given up as dead and a new one is made (default 10000).
 *   httpPublish    true (default): without an open WebSocket (connecting, on SSE, not started),
 *                  publish() POSTs to /channels/{channel} instead, with the token as
 *                  "Authorization: Bearer <token>" (its `publish` claim must grant the channel;
 *                  pushd answers CORS for allowed origins), or the apiKey, or nothing (a
 *                  loopback producer). false: publish() needs the WebSocket and rejects otherwise.
 *   apiKey         sent as "Authorization: Bearer <key>" with those POSTs instead of the token.
 *   withCredentials  passed to EventSource (cookies to another origin), default false.
 *   autoConnect    connect on the first subscribe() (default true); else call connect().
 *
 * Methods:
 *   connect()                      start (idempotent); close() stops and stays stopped.
 *   subscribe(channel, onMessage?, { since? })  -> unsubscribe function for this onMessage;
 *                                  onMessage(data, { channel, id, data }). When its last
 *                                  handler goes, the channel is unsubscribed. `since`: a message
 *                                  id to start after (recover what was missed while away).
 *   unsubscribe(channel)           drop the channel and all its handlers.
 *   publish(channel, data)         -> Promise. Over the WebSocket (a `publish` frame): resolves
 *                                  {channel} once pushd has taken the frame (the client's next
 *                                  ping came back without an `error` for it), rejects with a
 *                                  PushdError (code "forbidden", "rate_limited", "too_large",
 *                                  ...). A Redis outage is reported later, as an "error" event
 *                                  with code "unavailable". Over HTTP (no WebSocket open):
 *                                  resolves the answer {channel, id}, rejects with pushd's error
 *                                  code ("forbidden", "rate_limited", "token_expired", ...).
 *                                  httpPublish false and no WebSocket: rejects with code
 *                                  "not_connected" (or "not_supported" on SSE). Leaving the
 *                                  page: navigator.sendBeacon(`${url}/channels/${channel}?token=
 *                                  ${token}`, text) publishes too (as text: a beacon cannot send
 *                                  application/json to another origin).
 *   presence(channel)              -> Promise of {channel, count, users, clients}: who is in a
 *                                  channel this client is subscribed to (pushd's --presence
 *                                  channels), over the WebSocket. `count` members (one per
 *                                  subscribed connection), `users` distinct users, `clients`
 *                                  the members {client, user, info} (capped by pushd's
 *                                  --max-presence-list). Answers for one channel come in the
 *                                  order asked. Rejects with a PushdError: "forbidden" (not
 *                                  subscribed to it), "presence_off" (no presence there),
 *                                  "rate_limited", "unavailable" (pushd could not read it),
 *                                  "unknown_type" (a pushd without presence),
 *                                  "not_connected" (no open WebSocket: ask again once
 *                                  "subscribed" fires), "not_supported" (on SSE) and
 *                                  "connection_lost" (lost before the answer).
 *   on(event, fn) -> off function; off(event, fn).
 *   state, transport ("websocket" | "sse" | null), channels, lastId(channel) (the channel's
 *   resume point: the last id delivered, else pushd's position; "0-0": from its beginning).
 *
 * Events:
 *   "state"       fn(state, info): "idle" (not started), "connecting" (first attempt), "open",
 *                 "reconnecting" (lost; info.delay ms until the next attempt, info.attempt),
 *                 "closed" (close() was called, or pushd closed with 4003).
 *   "subscribed"  fn(channel, recovered, position): pushd confirmed a subscription; `recovered`
 *                 true means nothing after the last id seen was missed (false on a first
 *                 subscribe, or when history no longer reaches back that far); `position` is the
 *                 channel's newest id (null: no history yet).
 *   "unsubscribed" fn(channel); "message" fn(message) for every message delivered;
 *   "transport"   fn(name) when the transport is chosen or changes (WebSocket -> SSE).
 *   "join", "leave"  fn(channel, member): a member {client, user, info} came to or left a
 *                 subscribed channel (pushd's --join-leave channels; WebSocket and SSE). pushd
 *                 may announce a member twice (after an outage) or a leave without its join:
 *                 keep members keyed by `member.client`, and after a reconnect ask presence()
 *                 again ("subscribed" fires), as comings and goings while away are not replayed.
 *   "error"       fn(PushdError): pushd's `error` frames {code, message, channel?} not tied to
 *                 a publish, a failed token callback ("token"), a stream failure ("sse"), a
 *                 connection closed by pushd with a close code ("closed", err.closeCode).
 *
 * Reconnecting: after a lost connection the client waits a jittered exponential delay
 * (minDelay * 2^attempt, capped at maxDelay, then a random 50..100% of it), asks the token
 * function again, reconnects and subscribes every channel with `since` = the last id it
 * delivered on that channel, or, on a channel that delivered nothing yet, the `position` pushd
 * gave when it subscribed ("0-0" when the channel had no history), so pushd replays what was
 * missed (from its history), on quiet channels too. It goes back
 * to attempt 0 once a connection opens. Close codes: 1001 (pushd stopping) and 4008 (slow
 * consumer): reconnect with backoff; 4001 (token expired): reconnect at once with a fresh token;
 * 4003 (disconnected by the application): NO reconnect, state "closed". When the browser says it
 * is back online, a waiting reconnect happens at once.
 *
 * SSE: one EventSource for all channels, /sse?channel=a&channel=b&since=<cursor>&token=...,
 * where the cursor carries each channel's resume point (as above); subscribing or unsubscribing
 * reopens it (with the cursor, so nothing is lost). The client reopens it itself after an error,
 * with the backoff above and a fresh token, rather than letting EventSource retry.
 *
 * Exactly once, in order: a message whose id is not newer than the last one delivered on its
 * channel is dropped, so replays and reconnects never deliver an id twice nor an older id after
 * a newer one. (Messages PUBLISHed straight into Redis carry no id: always delivered.)
 */

/** An error from pushd or from the client: `code` (pushd's codes, or the client's own:
 *  not_connected, not_supported, connection_lost, closed, token, sse, http), `channel`,
 *  `status` (HTTP) and `closeCode` (WebSocket) when they apply. */
export class PushdError extends Error {
  constructor(code, message, extra = {}) {
    super(message || code);
    this.name = "PushdError";
    this.code = code;
    Object.assign(this, extra);
  }
}

/** Compare two message ids "<ms>-<seq>": negative, 0 or positive. */
export function compareIds(a, b) {
  const [am, as = "0"] = String(a).split("-");
  const [bm, bs = "0"] = String(b).split("-");
  return Number(am) - Number(bm) || Number(as) - Number(bs);
}

// What pushd may answer a presence request with, besides its answer.
const PRESENCE_REFUSALS = new Set(["forbidden", "presence_off", "rate_limited", "unavailable"]);

const DEFAULTS = {
  url: null,
  token: null,
  transport: "auto",
  fallbackAfter: 3,
  minDelay: 500,
  maxDelay: 15000,
  pingInterval: 25000,
  pingTimeout: 10000,
  httpPublish: true,
  apiKey: null,
  withCredentials: false,
  autoConnect: true,
};

function report(error) {
  // A listener's exception must not break the client: rethrow it where the console sees it.
  setTimeout(() => {
    throw error;
  }, 0);
}

export class PushdClient {
  constructor(options = {}) {
    this.options = { ...DEFAULTS, ...options };
    const base = this.options.url ?? globalThis.location?.origin;
    if (!base) throw new TypeError("pushd: no url given and no page origin to default to");
    this._base = new URL(base, globalThis.location?.href);
    this.state = "idle";
    this.transport = null;
    this._channels = new Map(); // channel -> {handlers: Set, lastId, subscribed}
    this._listeners = new Map();
    this._useSse = this.options.transport === "sse";
    this._wsEverOpened = false;
    this._wsFailures = 0;
    this._attempt = 0;
    this._gen = 0; // bumped for every connection: callbacks of an old one are ignored
    this._ws = null;
    this._es = null;
    this._retryTimer = null;
    this._heartbeat = null;
    this._reopenQueued = false;
    this._pingQueued = false;
    // Requests whose ping has not come back: {kind, channel, window, ...}; and presence
    // requests until their answer (acked once their ping is back: see _frame's "error").
    this._inflight = [];
    this._pingsSent = 0;
    this._pongs = 0;
    this._pingTimes = [];
    this._onOnline = () => {
      if (this._retryTimer !== null) {
        clearTimeout(this._retryTimer);
        this._retryTimer = null;
        this._open();
      }
    };
  }

  // -- events

  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    this._listeners.get(event)?.delete(fn);
  }

  _emit(event, ...args) {
    for (const fn of [...(this._listeners.get(event) ?? [])]) {
      try {
        fn(...args);
      } catch (e) {
        report(e);
      }
    }
  }

  _error(code, message, extra) {
    this._emit("error", new PushdError(code, message, extra));
  }

  _setState(state, info = {}) {
    if (state === this.state && state !== "reconnecting") return;
    this.state = state;
    this._emit("state", state, info);
  }

  // -- public API

  get channels() {
    return [...this._channels.keys()];
  }

  lastId(channel) {
    return this._channels.get(channel)?.lastId ?? null;
  }

  connect() {
    if (this.state !== "idle" && this.state !== "closed") return this;
    this._closed = false;
    this._attempt = 0;
    globalThis.addEventListener?.("online", this._onOnline);
    this._setState("connecting");
    this._open();
    return this;
  }

  close() {
    this._closed = true;
    this._gen++;
    globalThis.removeEventListener?.("online", this._onOnline);
    this._teardown("closed", "the client was closed");
    this._setState("closed");
  }

  subscribe(channel, onMessage, options = {}) {
    if (typeof channel !== "string" || !channel) throw new TypeError("pushd: a channel name");
    let ch = this._channels.get(channel);
    const isNew = !ch;
    if (isNew) {
      ch = { handlers: new Set(), lastId: options.since ?? null, subscribed: false };
      this._channels.set(channel, ch);
    } else if (options.since && !ch.lastId) {
      ch.lastId = options.since;
    }
    const entry = { fn: onMessage };
    if (onMessage) ch.handlers.add(entry);
    if (isNew) this._subscribeOnWire(channel, ch);
    if (this.state === "idle" && this.options.autoConnect) this.connect();
    return () => {
      if (this._channels.get(channel) !== ch || !ch.handlers.delete(entry)) return;
      if (ch.handlers.size === 0) this.unsubscribe(channel);
    };
  }

  unsubscribe(channel) {
    if (!this._channels.delete(channel)) return;
    if (this._wsOpen()) {
      this._send({ type: "unsubscribe", channel });
    } else if (this.transport === "sse") {
      this._queueReopen();
    }
  }

  publish(channel, data) {
    if (data === undefined) {
      return Promise.reject(new PushdError("bad_request", "publish needs data", { channel }));
    }
    if (this._wsOpen()) {
      return new Promise((resolve, reject) => {
        this._send({ type: "publish", channel, data });
        this._inflight.push({
          kind: "publish",
          channel,
          window: this._pingsSent,
          resolve: () => resolve({ channel }),
          reject,
        });
        this._queuePing();
      });
    }
    if (this.options.httpPublish) return this._post(channel, data);
    return Promise.reject(
      this.transport === "sse"
        ? new PushdError("not_supported", "SSE cannot publish (set httpPublish to POST instead)", {
            channel,
          })
        : new PushdError("not_connected", "not connected to pushd", { channel }),
    );
  }

  presence(channel) {
    if (!this._wsOpen()) {
      return Promise.reject(
        this.transport === "sse"
          ? new PushdError("not_supported", "presence needs the WebSocket", { channel })
          : new PushdError("not_connected", "not connected to pushd", { channel }),
      );
    }
    return new Promise((resolve, reject) => {
      this._send({ type: "presence", channel });
      this._inflight.push({
        kind: "presence",
        channel,
        window: this._pingsSent,
        acked: false,
        resolve,
        reject,
      });
      this._queuePing();
    });
  }

  // -- connections

  _url(scheme, path, params) {
    const url = new URL(this._base.href);
    const secure = url.protocol === "https:" || url.protocol === "wss:";
    url.protocol = scheme === "ws" ? (secure ? "wss:" : "ws:") : secure ? "https:" : "http:";
    url.pathname = url.pathname.replace(/\/+$/, "") + path;
    url.search = "";
    url.hash = "";
    for (const [k, v] of params) url.searchParams.append(k, v);
    return url.href;
  }

  async _open() {
    const gen = ++this._gen;
    this._retryTimer = null;
    let token = null;
    try {
      const t = this.options.token;
      token = typeof t === "function" ? await t() : t;
    } catch (e) {
      if (gen !== this._gen) return;
      this._error("token", `the token callback failed: ${e?.message ?? e}`, { cause: e });
      this._retry();
      return;
    }
    if (gen !== this._gen) return;
    const params = token ? [["token", token]] : [];
    if (this._useSse || typeof WebSocket === "undefined") this._openSse(gen, params);
    else this._openWs(gen, params);
  }

  _setTransport(name) {
    if (this.transport !== name) {
      this.transport = name;
      this._emit("transport", name);
    }
  }

  _opened() {
    this._attempt = 0;
    this._setState("open", { transport: this.transport });
  }

  _openWs(gen, params) {
    this._setTransport("websocket");
    let ws;
    try {
      ws = new WebSocket(this._url("ws", "/ws", params));
    } catch (e) {
      this._error("websocket", e?.message ?? String(e));
      this._lost(gen, 1006, "", false);
      return;
    }
    this._ws = ws;
    let opened = false;
    ws.onopen = () => {
      if (gen !== this._gen) return;
      opened = true;
      this._wsEverOpened = true;
      this._wsFailures = 0;
      this._pingsSent = this._pongs = 0;
      this._pingTimes = [];
      this._lastPing = Date.now();
      this._opened();
      for (const [channel, ch] of this._channels) this._subscribeOnWire(channel, ch);
      this._startHeartbeat(gen);
    };
    ws.onmessage = (event) => {
      if (gen !== this._gen) return;
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      this._frame(frame);
    };
    ws.onclose = (event) => {
      if (gen !== this._gen) return;
      this._lost(gen, event.code, event.reason, opened);
    };
  }

  _openSse(gen, params) {
    this._setTransport("sse");
    const names = [...this._channels.keys()];
    if (names.length === 0) {
      this._opened(); // nothing to stream yet: a subscribe() opens the stream
      return;
    }
    const query = names.map((c) => ["channel", c]);
    // pushd's compact cursor: "1", a check, then each channel's id in this URL's
    // order ("" for none). The check "_" says "made for this very URL": no hash
    // here (crypto.subtle is missing outside secure contexts).
    const ids = names.map((c) => this._channels.get(c).lastId || "");
    if (ids.some((id) => id)) query.push(["since", ["1", "_", ...ids].join(".")]);
    const es = new EventSource(this._url("http", "/sse", [...query, ...params]), {
      withCredentials: this.options.withCredentials,
    });
    this._es = es;
    let opened = false;
    es.onopen = () => {
      if (gen !== this._gen) return;
      opened = true;
      this._opened();
    };
    es.onmessage = (event) => {
      if (gen !== this._gen) return;
      try {
        this._deliver(JSON.parse(event.data));
      } catch {
        /* not an envelope */
      }
    };
    for (const type of ["subscribed", "join", "leave"]) {
      es.addEventListener(type, (event) => {
        if (gen !== this._gen) return;
        let frame;
        try {
          frame = JSON.parse(event.data);
        } catch {
          return; // not JSON
        }
        this._frame({ ...frame, type });
      });
    }
    es.onerror = () => {
      if (gen !== this._gen) return;
      es.close(); // we reconnect ourselves: fresh token, our backoff, our cursor
      if (!opened) this._error("sse", "the event stream could not be opened");
      this._lost(gen, 0, "stream ended", opened);
    };
  }

  /** Subscribing or unsubscribing on SSE: reopen the one stream with the new channel set. */
  _queueReopen() {
    if (this._reopenQueued) return;
    this._reopenQueued = true;
    queueMicrotask(() => {
      this._reopenQueued = false;
      // Only a stream that is open or opening: a waiting reconnect reads the channels anyway.
      if (this._closed || this.transport !== "sse") return;
      if (this._es === null && this.state !== "open") return;
      this._gen++;
      this._es?.close();
      this._es = null;
      this._open();
    });
  }

  _subscribeOnWire(channel, ch) {
    ch.subscribed = false;
    if (this._wsOpen()) {
      const frame = { type: "subscribe", channel };
      if (ch.lastId) frame.since = ch.lastId;
      this._send(frame);
      this._inflight.push({ kind: "subscribe", channel, window: this._pingsSent });
      this._queuePing();
    } else if (this.transport === "sse") {
      this._queueReopen();
    }
  }

  /** Close whatever is open; fail what waits on it. */
  _teardown(code, message) {
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    clearInterval(this._heartbeat);
    this._heartbeat = null;
    if (this._ws) {
      const ws = this._ws;
      this._ws = null;
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      if (ws.readyState === 0 || ws.readyState === 1) ws.close(1000);
    }
    if (this._es) {
      this._es.close();
      this._es = null;
    }
    const inflight = this._inflight;
    this._inflight = [];
    for (const r of inflight) r.reject?.(new PushdError(code, message, { channel: r.channel }));
    for (const ch of this._channels.values()) ch.subscribed = false;
  }

  _lost(gen, code, reason, opened) {
    if (gen !== this._gen || this._closed) return;
    this._gen++;
    this._teardown("connection_lost", "the connection was lost before pushd answered");
    if (code === 4003) {
      this._closed = true;
      this._error("closed", reason || "disconnected by the application", { closeCode: code });
      this._setState("closed", { code, reason });
      return;
    }
    if (code >= 4000) this._error("closed", reason || `closed with ${code}`, { closeCode: code });
    if (this.transport === "websocket" && !opened) {
      this._wsFailures++;
      if (
        this.options.transport === "auto" &&
        !this._wsEverOpened &&
        this._wsFailures >= this.options.fallbackAfter &&
        typeof EventSource !== "undefined"
      ) {
        this._useSse = true;
        this._setTransport("sse");
        this._attempt = 0;
      }
    }
    this._retry(code === 4001 ? 0 : undefined);
  }

  _retry(delay) {
    if (this._closed) return;
    if (delay === undefined) {
      const { minDelay, maxDelay } = this.options;
      const ceiling = Math.min(maxDelay, minDelay * 2 ** Math.min(this._attempt, 30));
      delay = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
    }
    this._attempt++;
    this._setState("reconnecting", { delay, attempt: this._attempt });
    this._retryTimer = setTimeout(() => this._open(), delay);
  }

  // -- WebSocket frames

  _wsOpen() {
    return this._ws !== null && this._ws.readyState === 1 && this.state === "open";
  }

  _send(frame) {
    this._ws.send(JSON.stringify(frame));
  }

  /** One ping after the frames of this task: its pong settles the requests sent before it. */
  _queuePing() {
    if (this._pingQueued) return;
    this._pingQueued = true;
    queueMicrotask(() => {
      this._pingQueued = false;
      if (this._wsOpen()) this._ping();
    });
  }

  _ping() {
    this._pingsSent++;
    this._lastPing = Date.now();
    this._pingTimes.push(this._lastPing);
    this._send({ type: "ping" });
  }

  _startHeartbeat(gen) {
    const { pingInterval, pingTimeout } = this.options;
    if (!pingInterval) return;
    this._heartbeat = setInterval(
      () => {
        if (gen !== this._gen || !this._wsOpen()) return;
        const now = Date.now();
        if (this._pingTimes.length && now - this._pingTimes[0] > pingTimeout) {
          this._lost(gen, 1006, "no pong", true); // a dead connection: make a new one
        } else if (now - this._lastPing >= pingInterval) {
          this._ping();
        }
      },
      Math.max(100, Math.min(1000, pingInterval / 2)),
    );
  }

  _frame(frame) {
    switch (frame?.type) {
      case "message":
        this._deliver(frame);
        break;
      case "subscribed": {
        const ch = this._channels.get(frame.channel);
        if (!ch) break;
        ch.subscribed = true;
        if ("position" in frame) this._adoptPosition(ch, frame.position);
        this._emit("subscribed", frame.channel, frame.recovered === true, frame.position ?? null);
        break;
      }
      case "unsubscribed":
        this._emit("unsubscribed", frame.channel);
        break;
      case "join":
      case "leave":
        // A straggler of a channel already left is nobody's business any more.
        if (this._channels.has(frame.channel) && frame.member) {
          this._emit(frame.type, frame.channel, frame.member);
        }
        break;
      case "presence": {
        const i = this._inflight.findIndex(
          (r) => r.kind === "presence" && r.channel === frame.channel,
        );
        if (i < 0) break;
        const [request] = this._inflight.splice(i, 1);
        const { channel, count, users, clients } = frame;
        request.resolve({ channel, count, users, clients: clients ?? [] });
        break;
      }
      case "pong": {
        this._pongs++;
        this._pingTimes.shift();
        // A presence request outlives its ping (pushd reads Redis for the answer); the pong
        // only tells that pushd took it, so that a refusal can no longer be its.
        const due = (r) => r.window < this._pongs;
        const settled = this._inflight.filter((r) => due(r) && r.kind !== "presence");
        this._inflight = this._inflight.filter((r) => !due(r) || r.kind === "presence");
        for (const r of this._inflight) if (due(r)) r.acked = true;
        for (const r of settled) r.resolve?.();
        break;
      }
      case "error": {
        const error = new PushdError(frame.code, frame.message, { channel: frame.channel });
        // pushd refuses a bad frame at once, so a refusal is for the oldest unsettled request
        // on that channel (settled ones had their ping answered before this error came).
        // "unavailable" comes later, when reading Redis failed: only a presence request waits
        // for that (a publish's is reported as an event).
        const asked = (r) => r.kind === "presence" && r.channel === frame.channel;
        let i =
          frame.code === "unavailable"
            ? this._inflight.findIndex(asked)
            : this._inflight.findIndex((r) => r.channel === frame.channel && !r.acked);
        if (i < 0 && PRESENCE_REFUSALS.has(frame.code)) i = this._inflight.findIndex(asked);
        if (i < 0 && frame.code === "unknown_type") {
          // A pushd without presence: of our frames, only `presence` can be unknown to it.
          i = this._inflight.findIndex((r) => r.kind === "presence" && !r.acked);
        }
        const request = i >= 0 ? this._inflight[i] : null;
        if (request) this._inflight.splice(i, 1);
        if (request?.reject) request.reject(error);
        else this._emit("error", error);
        break;
      }
      default:
        break;
    }
  }

  /** pushd's `position` (the channel's newest id once live; null: no history, "0-0" to resume
   *  from its beginning) becomes the resume point of a channel that has none yet, so a quiet
   *  channel is resumed too; and of one whose `since` is ahead of the channel (clock skew),
   *  whose live messages would look old. Otherwise the resume point stays where it is: a replay
   *  after it follows, and a connection lost before it arrives must ask for it again. */
  _adoptPosition(ch, position) {
    const at = position ?? "0-0";
    if (!ch.lastId || compareIds(ch.lastId, at) > 0) ch.lastId = at;
  }

  _deliver(message) {
    const ch = this._channels.get(message?.channel);
    if (!ch) return;
    if (message.id != null) {
      if (ch.lastId && compareIds(message.id, ch.lastId) <= 0) return; // seen, or older
      ch.lastId = message.id;
    }
    for (const { fn } of [...ch.handlers]) {
      try {
        fn(message.data, message);
      } catch (e) {
        report(e);
      }
    }
    this._emit("message", message);
  }

  // -- HTTP publish

  async _post(channel, data) {
    const headers = { "content-type": "application/json" };
    let credential = this.options.apiKey;
    if (!credential && this.options.token) {
      try {
        const t = this.options.token;
        credential = typeof t === "function" ? await t() : t;
      } catch (e) {
        throw new PushdError("token", `the token callback failed: ${e?.message ?? e}`, {
          channel,
          cause: e,
        });
      }
    }
    if (credential) headers.authorization = `Bearer ${credential}`;
    let response;
    try {
      response = await fetch(this._url("http", `/channels/${encodeURIComponent(channel)}`, []), {
        method: "POST",
        headers,
        body: JSON.stringify(data),
      });
    } catch (e) {
      throw new PushdError("http", `the publish did not reach pushd: ${e?.message ?? e}`, {
        channel,
      });
    }
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      throw new PushdError(body.error ?? "http", body.message ?? `HTTP ${response.status}`, {
        channel,
        status: response.status,
      });
    }
    return body;
  }
}

export default PushdClient;
