// Run by tests/test_browser.py with page.evaluate in a page pushd serves (so /pushd.js and
// the connections are same-origin): a PushdClient with the options given, subscribed to
// `channel`, recording everything it does on window.
// `tokens`: the token callback answers them in turn (the last one from then on).
async ({ channel, tokens, ...options }) => {
  const { default: PushdClient } = await import("/pushd.js");
  window.received = [];
  window.seen = new Set();
  window.states = [];
  window.subscribed = [];
  window.errors = [];
  window.transports = [];
  window.tokenCalls = 0;
  if (tokens) {
    options.token = async () => tokens[Math.min(window.tokenCalls++, tokens.length - 1)];
  }
  const client = new PushdClient({ minDelay: 100, maxDelay: 500, ...options });
  window.client = client;
  client.on("state", (state) => window.states.push(state));
  client.on("transport", (name) => window.transports.push(name));
  client.on("subscribed", (ch, recovered) => window.subscribed.push({ channel: ch, recovered }));
  client.on("error", (e) =>
    window.errors.push({ code: e.code, message: e.message, closeCode: e.closeCode ?? null }),
  );
  client.subscribe(channel, (data, message) => {
    window.received.push({ id: message.id, data });
    window.seen.add(message.id);
  });
};
