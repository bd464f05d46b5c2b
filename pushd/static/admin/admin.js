// pushd admin console: hand-written, no framework, no build step.
// The view of all nodes comes over EventSource (GET api/events, `event: stats`
// each second); actions are fetch()es with the header the server's CSRF rule
// asks for. Everything from the server is put in the page as text, never HTML.
"use strict";

(function () {
  const WINDOW = 300; // seconds of history in the plots (5 minutes)
  const history = []; // {t, connections, published, deliveries}
  let source = null;
  let currentChannel = null;

  const $ = (id) => document.getElementById(id);

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    for (const child of children) {
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function number(n) {
    if (n === null || n === undefined) return "–";
    if (typeof n !== "number") return String(n);
    return Number.isInteger(n) ? n.toLocaleString("en") : n.toFixed(2);
  }

  function duration(seconds) {
    const s = Math.floor(seconds);
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${s % 60}s`;
    return `${s}s`;
  }

  // -- the API

  async function api(method, path, body) {
    const options = { method, headers: {}, credentials: "same-origin" };
    if (method !== "GET") options.headers["X-Pushd-Admin"] = "1";
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    const response = await fetch("api/" + path, options);
    const text = await response.text();
    let answer = null;
    try {
      answer = text ? JSON.parse(text) : null;
    } catch (e) {
      answer = { error: "bad_answer", message: text };
    }
    if (response.status === 401 && path !== "login") showLogin("Your session expired: log in again.");
    return { status: response.status, ok: response.ok, answer };
  }

  function report(what, result) {
    const out = $("result");
    out.dataset.state = result.ok ? "ok" : "error";
    out.textContent = `${what}: ${result.status} ${JSON.stringify(result.answer)}`;
  }

  // -- confirmation

  function confirmAction(text) {
    const dialog = $("confirm");
    $("confirm-text").textContent = text;
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.returnValue = "";
      dialog.showModal();
    });
  }

  // -- login

  function showLogin(message) {
    stopEvents();
    $("app").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("password").focus();
  }

  function showApp() {
    $("login").hidden = true;
    $("app").hidden = false;
    $("logout").hidden = false;
    startEvents();
    openFromHash();
  }

  async function login(event) {
    event.preventDefault();
    const result = await api("POST", "login", { password: $("password").value });
    $("password").value = "";
    if (result.status === 204) {
      showApp();
    } else if (result.status === 429) {
      $("login-error").textContent = "Too many attempts: wait a few seconds.";
    } else {
      $("login-error").textContent = "Wrong password.";
    }
  }

  async function logout() {
    await api("POST", "logout");
    showLogin("Logged out.");
  }

  // -- live view

  function setLive(state, text) {
    $("live").dataset.state = state;
    $("live").textContent = text;
  }

  function startEvents() {
    stopEvents();
    source = new EventSource("api/events");
    source.addEventListener("open", () => setLive("open", "live"));
    source.addEventListener("error", async () => {
      setLive("error", "reconnecting");
      // A stream refused (logged out, expired) is not retried by the browser.
      if (source && source.readyState === EventSource.CLOSED) {
        const session = await api("GET", "session");
        if (session.ok && session.answer && !session.answer.authenticated) showLogin();
        else setTimeout(startEvents, 2000);
      }
    });
    source.addEventListener("stats", (event) => render(JSON.parse(event.data)));
  }

  function stopEvents() {
    if (source) source.close();
    source = null;
    setLive("off", "offline");
  }

  function render(view) {
    const totals = view.totals || {};
    $("total-nodes").textContent = number(totals.nodes);
    $("total-connections").textContent = number(totals.connections);
    $("total-subscriptions").textContent = number(totals.subscriptions);
    $("total-published").textContent = number(totals.published_per_s);
    $("total-deliveries").textContent = number(totals.deliveries_per_s);
    $("total-presence").textContent = number(totals.presence);
    $("partial").hidden = !view.partial;
    renderNodes(view.nodes || []);
    renderChannels($("top-subscribers"), view.top_subscribers || [], "subscribers", "");
    renderChannels($("top-rates"), view.top_rates || [], "rate", "/s");
    history.push({
      t: view.time,
      connections: totals.connections || 0,
      published: totals.published_per_s || 0,
      deliveries: totals.deliveries_per_s || 0,
    });
    while (history.length && history[0].t < view.time - WINDOW * 1000) history.shift();
    plot($("plot-connections"), "connections", "#2563eb");
    plot($("plot-published"), "published", "#13804b");
    plot($("plot-deliveries"), "deliveries", "#b45309");
  }

  function renderNodes(nodes) {
    const body = $("nodes").tBodies[0];
    body.replaceChildren(
      ...nodes.map((node) => {
        const redis = el("td");
        if (!node.redis || !node.redis.length) redis.append("memory");
        for (const shard of node.redis || []) {
          redis.append(el("span", {
            className: "shard " + (shard.up ? "up" : "down"),
            textContent: `${shard.redis} ${shard.up ? "up" : "down"}`,
            title: shard.same_list ? "" : "this node's --redis list differs from the others'",
          }));
        }
        const row = el(
          "tr",
          {},
          el("td", { textContent: (node.addresses || []).join(", ") }),
          el("td", { textContent: node.node }),
          el("td", { textContent: node.version }),
          el("td", { textContent: duration(node.uptime || 0) }),
          el("td", { className: "num connections", textContent: number(node.connections) }),
          el("td", { className: "num", textContent: number(node.subscriptions) }),
          el("td", { className: "num", textContent: number(node.published_per_s) }),
          el("td", { className: "num", textContent: number(node.presence) }),
          redis
        );
        row.dataset.node = node.node;
        return row;
      })
    );
  }

  function renderChannels(list, entries, field, unit) {
    if (!entries.length) {
      list.replaceChildren(el("li", { className: "none", textContent: "none" }));
      return;
    }
    list.replaceChildren(
      ...entries.map((entry) => {
        const link = el("a", {
          href: "#channel/" + encodeURIComponent(entry.channel),
          textContent: entry.channel,
        });
        const item = el("li", {}, link, el("span", { className: "n", textContent: number(entry[field]) + unit }));
        item.dataset.channel = entry.channel;
        return item;
      })
    );
  }

  // -- plots: a line over the last WINDOW seconds on a <canvas>

  function plot(canvas, key, color) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth, height = canvas.clientHeight;
    if (!width || !height) return;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const values = history.map((p) => p[key]);
    const max = Math.max(1, ...values);
    const top = niceCeiling(max);
    const pad = { left: 36, right: 6, top: 8, bottom: 14 };
    const w = width - pad.left - pad.right, h = height - pad.top - pad.bottom;
    ctx.font = "10px system-ui, sans-serif";
    ctx.fillStyle = "#667085";
    ctx.strokeStyle = "#d9dee7";
    ctx.lineWidth = 1;
    for (const f of [0, 0.5, 1]) {
      const y = pad.top + h - f * h;
      ctx.beginPath();
      ctx.moveTo(pad.left, Math.round(y) + 0.5);
      ctx.lineTo(pad.left + w, Math.round(y) + 0.5);
      ctx.stroke();
      ctx.fillText(shortNumber(top * f), 2, y + 3);
    }
    ctx.fillText("-5 min", pad.left, height - 2);
    ctx.fillText("now", pad.left + w - 18, height - 2);
    if (!history.length) return;
    const now = history[history.length - 1].t;
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    history.forEach((p, i) => {
      const x = pad.left + w - ((now - p.t) / (WINDOW * 1000)) * w;
      const y = pad.top + h - (p[key] / top) * h;
      if (i === 0) ctx.moveTo(x, y);
      else ctx.lineTo(x, y);
    });
    ctx.stroke();
  }

  function niceCeiling(n) {
    const magnitude = Math.pow(10, Math.floor(Math.log10(n)));
    for (const step of [1, 2, 5, 10]) {
      if (step * magnitude >= n) return step * magnitude;
    }
    return 10 * magnitude;
  }

  function shortNumber(n) {
    if (n >= 1e6) return (n / 1e6).toFixed(n % 1e6 ? 1 : 0) + "M";
    if (n >= 1e3) return (n / 1e3).toFixed(n % 1e3 ? 1 : 0) + "k";
    return String(Math.round(n * 100) / 100);
  }

  // -- a channel

  function openFromHash() {
    const match = /^#channel\/(.+)$/.exec(location.hash);
    if (match) openChannel(decodeURIComponent(match[1]));
  }

  async function openChannel(name) {
    currentChannel = name;
    $("channel-name").value = name;
    const result = await api("GET", "channels/" + encodeURIComponent(name));
    if (!result.ok) {
      report(`channel ${name}`, result);
      $("channel-view").hidden = true;
      return;
    }
    const info = result.answer;
    $("channel-view").hidden = false;
    $("channel-title").textContent = info.channel;
    $("channel-last-id").textContent = info.last_id === null ? "none" : info.last_id;
    $("channel-subscribers").textContent = number(info.subscribers);
    $("channel-messages").replaceChildren(
      ...(info.messages.length
        ? info.messages.slice().reverse().map((m) => {
            const item = el(
              "li",
              {},
              el("span", { className: "id", textContent: m.id }),
              el("span", { className: "data", textContent: JSON.stringify(m.data) })
            );
            item.dataset.id = m.id;
            return item;
          })
        : [el("li", { className: "none", textContent: "no history" })])
    );
    const box = $("channel-presence-box");
    box.hidden = !info.presence;
    if (info.presence) {
      $("channel-presence-count").textContent =
        `${info.presence.count} members, ${info.presence.users} users`;
      $("channel-presence").replaceChildren(
        ...info.presence.clients.map((c) =>
          el("li", {
            textContent: `${c.user === null ? "(anonymous)" : c.user} · ${c.client}` +
              (c.info === null ? "" : " · " + JSON.stringify(c.info)),
          })
        )
      );
    }
  }

  async function publish(event) {
    event.preventDefault();
    if (!currentChannel) return;
    const text = $("publish-data").value;
    let data;
    try {
      data = JSON.parse(text);
    } catch (e) {
      data = text;
    }
    const channel = currentChannel;
    if (!(await confirmAction(`Publish to ${channel}: ${JSON.stringify(data)}?`))) return;
    const result = await api("POST", `channels/${encodeURIComponent(channel)}/publish`, { data });
    report(`publish to ${channel}`, result);
    if (result.ok && currentChannel === channel) openChannel(channel);
  }

  async function deleteChannel() {
    if (!currentChannel) return;
    const channel = currentChannel;
    const question = `Delete ${channel}? Every subscriber on every node leaves it and its history is dropped.`;
    if (!(await confirmAction(question))) return;
    const result = await api("DELETE", "channels/" + encodeURIComponent(channel));
    report(`delete ${channel}`, result);
    if (result.ok && currentChannel === channel) openChannel(channel);
  }

  async function disconnectUser() {
    const user = $("user-name").value.trim();
    if (!user) return $("user-name").reportValidity();
    if (!(await confirmAction(`Disconnect every connection of ${user} on every node (4003)?`))) return;
    const result = await api("POST", `users/${encodeURIComponent(user)}/disconnect`);
    report(`disconnect ${user}`, result);
  }

  async function unsubscribeUser() {
    const user = $("user-name").value.trim();
    const channel = $("unsubscribe-channel").value.trim();
    if (!user) return $("user-name").reportValidity();
    if (!channel) return $("unsubscribe-channel").reportValidity();
    if (!(await confirmAction(`Unsubscribe ${user} from ${channel} on every node?`))) return;
    const result = await api("POST", `users/${encodeURIComponent(user)}/unsubscribe`, { channel });
    report(`unsubscribe ${user} from ${channel}`, result);
  }

  // -- start

  async function start() {
    $("login-form").addEventListener("submit", login);
    $("logout").addEventListener("click", logout);
    $("channel-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const name = $("channel-name").value.trim();
      if (!name) return;
      const hash = "#channel/" + encodeURIComponent(name);
      if (location.hash === hash) openChannel(name);
      else location.hash = hash;
    });
    window.addEventListener("hashchange", openFromHash);
    $("publish-form").addEventListener("submit", publish);
    $("refresh-channel").addEventListener("click", () => currentChannel && openChannel(currentChannel));
    $("delete-channel").addEventListener("click", deleteChannel);
    $("disconnect-button").addEventListener("click", disconnectUser);
    $("unsubscribe-button").addEventListener("click", unsubscribeUser);
    window.addEventListener("resize", () => {
      plot($("plot-connections"), "connections", "#2563eb");
      plot($("plot-published"), "published", "#13804b");
      plot($("plot-deliveries"), "deliveries", "#b45309");
    });
    const session = await api("GET", "session");
    if (session.ok && session.answer.authenticated) showApp();
    else showLogin();
  }

  start();
})();
