// fanout-chat browser client.
//
// Sending goes over POST /messages; receiving goes over the /ws WebSocket,
// which delivers every message exactly once per session (including our own).
// Server settings arrive through data-* attributes on <body> because the CSP
// forbids inline scripts.
(() => {
  "use strict";

  const NAME_KEY = "fanout-chat.name";
  const MAX_DOM_ITEMS = 500; // rendered messages + notices kept in the log
  const MAX_REMEMBERED_IDS = 1000; // must exceed MAX_DOM_ITEMS so dedup outlives the DOM
  const NEAR_BOTTOM_PX = 40;
  const NEAR_LIMIT_RATIO = 0.9;
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 15000;
  const STABLE_CONNECTION_MS = 10000;
  const POST_TIMEOUT_MS = 15000;
  const MAX_COOLDOWN_S = 120;

  const $ = (id) => document.getElementById(id);
  const body = document.body;
  const maxBytes = Number.parseInt(body.dataset.maxBytes ?? "", 10) || 4096;

  const ui = {
    status: $("status"),
    statusLabel: document.querySelector("#status .status-label"),
    statusSuffix: document.querySelector("#status .status-suffix"),
    list: $("messages"),
    empty: $("empty"),
    curl: $("curl-example"),
    jump: $("jump"),
    form: $("composer"),
    name: $("name"),
    text: $("text"),
    send: $("send"),
    error: $("composer-error"),
    count: $("byte-count"),
  };

  const encoder = new TextEncoder();
  const timeFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
  const fullFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "medium" });
  const reducedMotion = window.matchMedia("(prefers-reduced-motion: reduce)");
  const baseTitle = document.title;

  // ---------------------------------------------------------------- helpers

  // Sets iterate in insertion order, so deleting the first entry evicts the
  // oldest id and keeps memory bounded in long sessions.
  function remember(set, id) {
    set.add(id);
    if (set.size > MAX_REMEMBERED_IDS) set.delete(set.values().next().value);
  }

  function isEnvelope(value) {
    return (
      value !== null &&
      typeof value === "object" &&
      typeof value.id === "string" &&
      value.id !== "" &&
      typeof value.text === "string"
    );
  }

  const byteLength = (text) => encoder.encode(text).length;
  const plural = (n, one, many) => (n === 1 ? one : many);

  function readStoredName() {
    try {
      return localStorage.getItem(NAME_KEY) ?? "";
    } catch {
      return ""; // storage can be disabled (privacy settings, sandboxed frames)
    }
  }

  function storeName(name) {
    try {
      if (name) localStorage.setItem(NAME_KEY, name);
      else localStorage.removeItem(NAME_KEY);
    } catch {
      // Not remembering the name is harmless.
    }
  }

  // ---------------------------------------------------------------- status

  // Only the label is announced: the countdown suffix is aria-hidden so a
  // screen reader hears "Reconnecting" once instead of every second.
  function setStatus(state, label, suffix = "", detail = "") {
    ui.status.dataset.state = state;
    if (ui.statusLabel.textContent !== label) ui.statusLabel.textContent = label;
    ui.statusSuffix.textContent = suffix;
    ui.status.title = detail;
  }

  // ------------------------------------------------------------ message log

  const seenIds = new Set();
  const ownIds = new Set();
  let logItems = 0;
  let pinned = true; // was the reader at the bottom at the last scroll event?
  let unread = 0;

  const distanceFromBottom = () => ui.list.scrollHeight - ui.list.scrollTop - ui.list.clientHeight;
  const isNearBottom = () => distanceFromBottom() <= NEAR_BOTTOM_PX;

  function scrollToBottom(smooth = false) {
    ui.list.scrollTo({
      top: ui.list.scrollHeight,
      behavior: smooth && !reducedMotion.matches ? "smooth" : "auto",
    });
    pinned = true;
    ui.jump.hidden = true;
  }

  function appendToLog(node, { forceScroll = false, counts = true } = {}) {
    // Decide before the node changes the geometry. `pinned` covers the case
    // where the composer grew and pushed the bottom out of reach since the
    // reader last scrolled.
    const stick = forceScroll || pinned || isNearBottom();
    ui.list.append(node);
    logItems += 1;
    trimLog(stick);
    if (stick) scrollToBottom();
    else if (counts) ui.jump.hidden = false;
  }

  function trimLog(stick) {
    if (logItems <= MAX_DOM_ITEMS) return;
    const heightBefore = ui.list.scrollHeight;
    while (logItems > MAX_DOM_ITEMS) {
      const oldest = ui.list.querySelector(".msg, .notice");
      if (!oldest) break;
      oldest.remove();
      logItems -= 1;
    }
    // Keep what the reader is looking at in place when content above it vanishes.
    if (!stick) ui.list.scrollTop -= heightBefore - ui.list.scrollHeight;
  }

  function addNotice(text) {
    const p = document.createElement("p");
    p.className = "notice";
    p.textContent = text;
    appendToLog(p, { counts: false });
  }

  function markOwn(id) {
    const el = ui.list.querySelector(`.msg[data-id="${CSS.escape(id)}"]`);
    if (el) el.classList.add("own");
  }

  function renderEnvelope(env) {
    if (seenIds.has(env.id)) return;
    remember(seenIds, env.id);

    const own = ownIds.has(env.id);
    const item = document.createElement("article");
    item.className = own ? "msg own" : "msg";
    item.dataset.id = env.id;

    const user = document.createElement("span");
    user.className = "msg-user";
    const name = typeof env.user === "string" ? env.user.trim() : "";
    if (name) {
      user.textContent = name;
      user.title = name; // long names are ellipsised
    } else {
      user.textContent = "anonymous";
      user.classList.add("anon");
    }

    const time = document.createElement("time");
    time.className = "msg-time";
    const when = new Date(typeof env.ts === "string" ? env.ts : NaN);
    if (Number.isNaN(when.getTime())) {
      time.textContent = "";
    } else {
      time.dateTime = env.ts;
      time.textContent = timeFormat.format(when);
      time.title = fullFormat.format(when);
    }

    const text = document.createElement("div");
    text.className = "msg-text";
    text.textContent = env.text;

    item.append(user, time, text);
    ui.empty.hidden = true;
    // Your own message always scrolls into view: you just sent it.
    appendToLog(item, { forceScroll: own });

    if (document.hidden && !own) {
      unread += 1;
      document.title = `(${unread}) ${baseTitle}`;
    }
  }

  ui.list.addEventListener(
    "scroll",
    () => {
      pinned = isNearBottom();
      if (pinned) ui.jump.hidden = true;
    },
    { passive: true },
  );

  ui.jump.addEventListener("click", () => {
    scrollToBottom(true);
    // The button hides itself; hand focus to the log rather than <body>.
    ui.list.focus({ preventScroll: true });
  });

  // The log's height changes when the composer grows, the error line
  // appears, or the on-screen keyboard opens; stay glued to the bottom.
  new ResizeObserver(() => {
    if (pinned) ui.list.scrollTop = ui.list.scrollHeight;
  }).observe(ui.list);

  // ------------------------------------------------------------ WebSocket

  let socket = null;
  let attempt = 0;
  let openedAt = 0;
  let retryTimer = 0;
  let countdownTimer = 0;
  let welcomedBefore = false;
  let suspended = false; // page is in the back/forward cache

  function socketUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${location.host}/ws`;
  }

  function cancelRetry() {
    clearTimeout(retryTimer);
    clearInterval(countdownTimer);
    retryTimer = 0;
    countdownTimer = 0;
  }

  function connect() {
    cancelRetry();
    if (socket || suspended) return;
    setStatus("connecting", "Connecting…");

    let ws;
    try {
      ws = new WebSocket(socketUrl());
    } catch (err) {
      console.warn("fanout-chat: cannot open WebSocket", err);
      scheduleReconnect("");
      return;
    }
    socket = ws;

    ws.addEventListener("open", () => {
      openedAt = Date.now();
    });
    ws.addEventListener("message", (event) => {
      if (ws === socket) handleFrame(event.data);
    });
    ws.addEventListener("close", (event) => {
      if (ws !== socket) return; // a socket we already gave up on
      socket = null;
      // Only a connection that proved healthy resets the backoff; otherwise a
      // server that accepts then immediately drops us would be hammered.
      if (openedAt && Date.now() - openedAt >= STABLE_CONNECTION_MS) attempt = 0;
      openedAt = 0;
      if (suspended) return;
      const detail = event.reason ? `Closed by server: ${event.reason} (code ${event.code})` : "";
      scheduleReconnect(detail);
    });
  }

  function scheduleReconnect(detail) {
    cancelRetry();
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** attempt);
    attempt = Math.min(attempt + 1, 16);
    // "Equal jitter": at least half the ceiling, so a restarted server is not
    // hit by every tab in the same instant, yet no retry comes absurdly early.
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    const due = Date.now() + delay;

    const tick = () => {
      const seconds = Math.max(1, Math.ceil((due - Date.now()) / 1000));
      setStatus("reconnecting", "Reconnecting", ` in ${seconds} s`, detail);
    };
    tick();
    countdownTimer = setInterval(tick, 250);
    retryTimer = setTimeout(connect, delay);
  }

  function reconnectNow() {
    if (socket || suspended) return;
    attempt = 0;
    connect();
  }

  function handleFrame(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return; // not JSON: nothing we understand
    }
    if (frame === null || typeof frame !== "object") return;

    if (!("type" in frame)) {
      if (isEnvelope(frame)) renderEnvelope(frame);
      return;
    }

    switch (frame.type) {
      case "welcome": {
        const detail = [
          frame.session && `session ${frame.session}`,
          frame.replica && `replica ${frame.replica}`,
        ]
          .filter(Boolean)
          .join(", ");
        setStatus("connected", "Connected", "", detail);
        // There is no history replay, so be honest about the hole.
        if (welcomedBefore) {
          addNotice("Reconnected. Messages sent while this page was disconnected are not shown.");
        }
        welcomedBefore = true;
        break;
      }
      case "interrupted":
        setStatus(
          "interrupted",
          "Delivery interrupted, waiting for the broker…",
          "",
          typeof frame.reason === "string" ? frame.reason : "",
        );
        break;
      case "restored":
        setStatus("connected", "Connected");
        break;
      case "gap": {
        const missed = Number(frame.missed);
        addNotice(
          Number.isInteger(missed) && missed > 0
            ? `${missed} ${plural(missed, "message was", "messages were")} skipped because this connection fell behind`
            : "Some messages were skipped because this connection fell behind",
        );
        break;
      }
      case "error":
        if (typeof frame.error === "string") showError(frame.error, "server");
        break;
      default:
        // Unknown frame types are ignored so the server can add new ones.
        break;
    }
  }

  window.addEventListener("online", reconnectNow);

  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState !== "visible") return;
    unread = 0;
    document.title = baseTitle;
    reconnectNow();
  });

  // An open socket keeps the page out of the back/forward cache; close it
  // when leaving and reopen if the page is restored from the cache.
  window.addEventListener("pagehide", () => {
    suspended = true;
    cancelRetry();
    if (socket) {
      const ws = socket;
      socket = null;
      ws.close(1000, "page hidden");
    }
  });

  window.addEventListener("pageshow", (event) => {
    if (!event.persisted) return;
    suspended = false;
    reconnectNow();
  });

  // ------------------------------------------------------------ composer

  let errorKind = ""; // "", "limit" or "server": which message owns the region
  let inFlight = false;
  let cooldownUntil = 0;
  let cooldownTimer = 0;
  let overLimit = false;

  function showError(text, kind) {
    ui.error.textContent = text;
    errorKind = text ? kind : "";
  }

  function clearError(kind) {
    if (!kind || errorKind === kind) showError("", "");
  }

  function updateSendButton() {
    const coolingDown = Date.now() < cooldownUntil;
    ui.send.disabled = inFlight || overLimit || coolingDown;
    ui.form.setAttribute("aria-busy", String(inFlight));
  }

  // Counts UTF-8 bytes, not characters: that is what the server limits.
  function updateByteCount() {
    const used = byteLength(ui.text.value);
    overLimit = used > maxBytes;
    ui.count.textContent = `${used} / ${maxBytes} bytes`;
    ui.count.dataset.level = overLimit ? "over" : used >= maxBytes * NEAR_LIMIT_RATIO ? "near" : "ok";
    if (overLimit) {
      showError(`Message is ${used} bytes; the limit is ${maxBytes} bytes.`, "limit");
    } else {
      clearError("limit");
    }
    updateSendButton();
  }

  // Browsers without `field-sizing: content` get the classic grow-to-fit.
  const autosize = CSS.supports("field-sizing", "content")
    ? () => {}
    : () => {
        ui.text.style.height = "auto";
        const borders = ui.text.offsetHeight - ui.text.clientHeight;
        ui.text.style.height = `${ui.text.scrollHeight + borders}px`;
      };

  function startCooldown(seconds) {
    const s = Math.min(Math.max(seconds, 1), MAX_COOLDOWN_S);
    cooldownUntil = Date.now() + s * 1000;
    clearTimeout(cooldownTimer);
    cooldownTimer = setTimeout(updateSendButton, s * 1000 + 50);
    updateSendButton();
    return s;
  }

  // Retry-After is either delta-seconds or an HTTP date.
  function parseRetryAfter(value) {
    if (!value) return 0;
    const seconds = Number(value);
    if (Number.isFinite(seconds)) return Math.ceil(seconds);
    const date = Date.parse(value);
    return Number.isNaN(date) ? 0 : Math.ceil((date - Date.now()) / 1000);
  }

  async function send() {
    if (inFlight || Date.now() < cooldownUntil) return;
    const text = ui.text.value;
    if (text.trim() === "") {
      ui.text.focus();
      return;
    }
    const used = byteLength(text);
    if (used > maxBytes) {
      updateByteCount(); // shows the limit sentence; nothing is sent
      return;
    }

    const user = ui.name.value.trim();
    const payload = user ? { text, user } : { text };

    inFlight = true;
    clearError("server");
    updateSendButton();
    const abort = new AbortController();
    const timeout = setTimeout(() => abort.abort(), POST_TIMEOUT_MS);

    try {
      const res = await fetch("/messages", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify(payload),
        signal: abort.signal,
      });
      const data = await res.json().catch(() => null);

      if (res.ok) {
        if (isEnvelope(data)) {
          remember(ownIds, data.id);
          // The WebSocket copy may have won the race; tag it after the fact.
          markOwn(data.id);
          // Show it now even if the socket is down or slower than the POST;
          // the id dedup drops whichever copy arrives second.
          renderEnvelope(data);
          scrollToBottom();
        }
        // Only clear what was sent: the user may have kept typing meanwhile.
        if (ui.text.value === text) {
          ui.text.value = "";
          autosize();
          updateByteCount();
        }
        clearError("server");
        return;
      }

      let sentence =
        data && typeof data.error === "string" && data.error
          ? data.error
          : `The server refused the message (HTTP ${res.status}).`;
      if (res.status === 429) {
        const wait = parseRetryAfter(res.headers.get("Retry-After"));
        if (wait > 0) sentence += ` You can send again in ${startCooldown(wait)} s.`;
      }
      showError(sentence, "server");
    } catch (err) {
      showError(
        err && err.name === "AbortError"
          ? "The server did not answer in time. Your message is still in the box; try again."
          : "Could not reach the server. Your message is still in the box; try again.",
        "server",
      );
    } finally {
      clearTimeout(timeout);
      inFlight = false;
      updateSendButton();
    }
  }

  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
    ui.text.focus();
  });

  ui.text.addEventListener("keydown", (event) => {
    // isComposing: Enter confirms an IME candidate (Japanese, Chinese, …)
    // and must not send half-typed text.
    if (event.key !== "Enter" || event.shiftKey || event.altKey || event.isComposing) return;
    event.preventDefault();
    send();
  });

  ui.text.addEventListener("input", () => {
    // A server complaint is about the text as it was; editing answers it.
    clearError("server");
    autosize();
    updateByteCount();
  });

  ui.name.addEventListener("input", () => storeName(ui.name.value.trim()));

  // ------------------------------------------------------------ start

  ui.name.value = readStoredName();
  ui.curl.textContent = `curl -d text=hello ${location.origin}/messages`;
  autosize();
  updateByteCount();
  connect();
})();
