// pushd.js — placeholder, replaced by the browser client.
export default {};
