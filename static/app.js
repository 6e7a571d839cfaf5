// fanout-chat browser client.
//
// Sending goes over POST /messages; receiving goes over the /ws WebSocket,
// which delivers every message exactly once per session (including our own).
// On load the page shows recent history (GET /messages) and then opens the
// socket with ?since=<newest id shown>, so the server replays whatever was
// published in between; every reconnect resumes the same way.
// Server settings arrive through data-* attributes on <body> because the CSP
// forbids inline scripts.
//
// Everything that shows text someone else wrote builds DOM nodes (textContent,
// createElement): no string of HTML is ever parsed.
(() => {
  "use strict";

  const NAME_KEY = "fanout-chat.name";
  const LAST_ID_KEY = "fanout-chat.last-id"; // sessionStorage: per tab, survives a reload
  const OWN_IDS_KEY = "fanout-chat.own-ids"; // sessionStorage: this tab's own messages
  const BANNER_KEY = "fanout-chat.mode-banner-dismissed"; // localStorage
  const MAX_STORED_OWN_IDS = 200;
  const PAGE_SIZE = 50; // messages per GET /messages page
  const HISTORY_TIMEOUT_MS = 10000;
  const MAX_DOM_ITEMS = 500; // rendered messages + notices kept in the log
  const MAX_REMEMBERED_IDS = 1000; // must exceed MAX_DOM_ITEMS so dedup outlives the DOM
  const NEAR_BOTTOM_PX = 40;
  const NEAR_LIMIT_RATIO = 0.9;
  const BACKOFF_MIN_MS = 500;
  // A person looking at the page waits at most this long between attempts; a
  // hidden tab backs off further (it reconnects at once when shown again).
  const BACKOFF_VISIBLE_MAX_MS = 5000;
  const BACKOFF_HIDDEN_MAX_MS = 30000;
  const STABLE_CONNECTION_MS = 10000;
  const POST_TIMEOUT_MS = 15000;
  const MAX_COOLDOWN_S = 120;
  const OUTBOX_RETRY_MS = 3000; // a queued message the server could not take yet
  const GROUP_WINDOW_MS = 5 * 60 * 1000; // one header for a sender's messages this close
  const USER_COLOURS = 8; // --user-0 … --user-7 in style.css
  const CLAMP_CHECK_CHARS = 300; // shorter texts cannot reach the clamp; not measured
  const CLAMP_CHECK_LINES = 12;
  const ANNOUNCE_DELAY_MS = 400; // batches a burst (a replay) into one sentence
  const MAX_ANNOUNCED_ONE_BY_ONE = 3;
  const ANNOUNCED_EXCERPT_CHARS = 200;
  const MAX_NAME_BYTES = 64; // the server's rule (MAX_USER_BYTES in src/chat.rs)

  const $ = (id) => document.getElementById(id);
  const body = document.body;
  const maxBytes = Number.parseInt(body.dataset.maxBytes ?? "", 10) || 4096;
  const singleProcess = body.dataset.mode === "memory";

  const ui = {
    status: $("status"),
    statusDot: document.querySelector("#status .status-dot"),
    statusLabel: document.querySelector("#status .status-label"),
    statusSuffix: document.querySelector("#status .status-suffix"),
    banner: $("mode-banner"),
    bannerDismiss: $("mode-banner-dismiss"),
    outage: $("outage"),
    outageTitle: $("outage-title"),
    outageDetail: $("outage-detail"),
    outageHold: $("outage-hold"),
    retry: $("retry"),
    list: $("messages"),
    loadOlder: $("load-older"),
    empty: $("empty"),
    outbox: $("outbox"),
    curl: $("curl-example"),
    jump: $("jump"),
    announcer: $("announcer"),
    form: $("composer"),
    name: $("name"),
    nameError: $("name-error"),
    hint: $("composer-hint"),
    text: $("text"),
    send: $("send"),
    error: $("composer-error"),
    count: $("byte-count"),
  };

  const encoder = new TextEncoder();
  const timeFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
  const fullFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "medium" });
  const dayFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
  const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "full" });
  const graphemeSegmenter =
    typeof Intl.Segmenter === "function" ? new Intl.Segmenter(undefined, { granularity: "grapheme" }) : null;
  const reducedMotion = window.matchMedia("(prefers-reduced-motion: reduce)");
  // A touch keyboard: Enter makes a new line there, and the button sends.
  const touchKeyboard = window.matchMedia("(hover: none) and (pointer: coarse)");
  const baseTitle = document.title;

  // ---------------------------------------------------------------- helpers

  // Sets iterate in insertion order, so deleting the first entry evicts the
  // oldest id and keeps memory bounded in long sessions. The bound grows with
  // the log (older pages can push it past MAX_DOM_ITEMS), so dedup always
  // outlives the DOM.
  function remember(set, id) {
    set.add(id);
    if (set.size > Math.max(MAX_REMEMBERED_IDS, logItems * 2)) set.delete(set.values().next().value);
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

  // What people call characters: an emoji with its modifiers, a letter with its
  // accents, each counts once.
  function graphemes(text) {
    if (graphemeSegmenter === null) return [...text];
    return [...graphemeSegmenter.segment(text)].map((s) => s.segment);
  }

  function readStorage(storage, key) {
    try {
      return storage.getItem(key);
    } catch {
      return null; // storage can be disabled (privacy settings, sandboxed frames)
    }
  }

  function writeStorage(storage, key, value) {
    try {
      if (value === null) storage.removeItem(key);
      else storage.setItem(key, value);
    } catch {
      // Not remembering is harmless: each caller says what is lost.
    }
  }

  const readStoredName = () => readStorage(localStorage, NAME_KEY) ?? "";
  const storeName = (name) => writeStorage(localStorage, NAME_KEY, name || null);
  const readLastId = () => readStorage(sessionStorage, LAST_ID_KEY) || null;
  // A reload still shows recent history without it; only the fallback is lost.
  const storeLastId = (id) => writeStorage(sessionStorage, LAST_ID_KEY, id);

  // The ids of the messages this tab sent, so a reload still shows them as its own.
  function readOwnIds() {
    try {
      const ids = JSON.parse(readStorage(sessionStorage, OWN_IDS_KEY) ?? "[]");
      return Array.isArray(ids) ? ids.filter((id) => typeof id === "string").slice(-MAX_STORED_OWN_IDS) : [];
    } catch {
      return [];
    }
  }

  // Only the "own" styling after a reload is lost without it.
  const storeOwnIds = (ids) =>
    writeStorage(sessionStorage, OWN_IDS_KEY, JSON.stringify([...ids].slice(-MAX_STORED_OWN_IDS)));

  // A time of day for today, with the date for anything older.
  function formatWhen(date) {
    const today = new Date().toDateString() === date.toDateString();
    return today ? timeFormat.format(date) : dayFormat.format(date);
  }

  // The local calendar day of a date, as <time datetime> writes a date.
  function dayKey(date) {
    const pad = (n) => String(n).padStart(2, "0");
    return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}`;
  }

  function dayLabel(key) {
    const now = new Date();
    if (key === dayKey(now)) return "Today";
    const yesterday = new Date(now.getFullYear(), now.getMonth(), now.getDate() - 1);
    if (key === dayKey(yesterday)) return "Yesterday";
    const [y, m, d] = key.split("-").map(Number);
    return dateFormat.format(new Date(y, m - 1, d));
  }

  // The same name always gets the same colour, in every browser.
  function colourOf(name) {
    let hash = 0x811c9dc5; // FNV-1a over the UTF-16 code units
    for (let i = 0; i < name.length; i += 1) {
      hash ^= name.charCodeAt(i);
      hash = Math.imul(hash, 0x01000193) >>> 0;
    }
    return hash % USER_COLOURS;
  }

  const senderName = (env) => (typeof env.user === "string" && env.user.trim()) || "anonymous";

  // ---------------------------------------------------------------- status

  // Only the label is announced (role="status"), and it changes once per
  // change of state: "Reconnecting" stays put across the attempts of one
  // outage, while the countdown goes in the aria-hidden suffix. The session
  // details are a tooltip on the dot, out of the status's accessible name.
  function setStatus(state, label, suffix = "", detail = "") {
    ui.status.dataset.state = state;
    if (ui.statusLabel.textContent !== label) ui.statusLabel.textContent = label;
    ui.statusSuffix.textContent = suffix;
    ui.statusDot.title = detail;
  }

  // The bar over the log while messages cannot flow, with "Retry now" while
  // the connection is being retried.
  function showOutage({ title, detail, retry }) {
    ui.outageTitle.textContent = title;
    ui.outageDetail.textContent = detail;
    ui.retry.hidden = !retry;
    ui.outage.hidden = false;
  }

  function hideOutage() {
    if (ui.outage.hidden) return;
    // The button goes with the bar: hand focus to the message box, not <body>
    // (to the log on a touch screen, where the box would open the keyboard).
    const hadFocus = ui.outage.contains(document.activeElement);
    ui.outage.hidden = true;
    delete ui.outage.dataset.retryAt;
    if (hadFocus) (touchKeyboard.matches ? ui.list : ui.text).focus({ preventScroll: true });
  }

  // ------------------------------------------------------------ announcer

  // The log itself is not a live region: it would read one's own messages,
  // every page of history and every replayed message. Others' new messages are
  // said here instead, a burst (a replay after a reconnect) in one sentence.
  const toAnnounce = [];
  let announceTimer = 0;
  const sending = new Set(); // "user\0text" of this tab's messages in flight

  function say(sentence) {
    const p = document.createElement("p");
    p.textContent = sentence;
    ui.announcer.append(p);
    while (ui.announcer.childElementCount > 5) ui.announcer.firstElementChild.remove();
  }

  function excerpt(text) {
    const chars = [...text.trim()];
    return chars.length > ANNOUNCED_EXCERPT_CHARS
      ? `${chars.slice(0, ANNOUNCED_EXCERPT_CHARS).join("")}…`
      : chars.join("");
  }

  function announceMessage(env) {
    toAnnounce.push(env);
    if (!announceTimer) announceTimer = setTimeout(flushAnnouncements, ANNOUNCE_DELAY_MS);
  }

  function flushAnnouncements() {
    announceTimer = 0;
    // Checked now rather than on arrival: the socket's copy of our own message
    // can come before the POST's answer says it is ours.
    const ownSending = (env) => sending.has(`${(env.user ?? "").trim()}\u0000${env.text}`);
    const batch = toAnnounce.splice(0).filter((env) => !ownIds.has(env.id) && !ownSending(env));
    if (batch.length === 0) return;
    if (batch.length > MAX_ANNOUNCED_ONE_BY_ONE) {
      const last = batch.at(-1);
      say(`${batch.length} new messages. The latest, from ${senderName(last)}: ${excerpt(last.text)}`);
      return;
    }
    for (const env of batch) say(`${senderName(env)}: ${excerpt(env.text)}`);
  }

  // ------------------------------------------------------------ message text

  // http(s) URLs become links. What ends a sentence is not part of the URL:
  // trailing punctuation, and a closing bracket without its opening one.
  const URL_PATTERN = /\bhttps?:\/\/[^\s<>"]+/gi;
  const TRAILING_PUNCTUATION = ".,;:!?'\"*_~";
  const CLOSERS = { ")": "(", "]": "[", "}": "{" };
  const BREAK_BEFORE = "/?&#";
  const UNBROKEN_URL_PART = 24; // characters: fits a line of a 320 px screen

  function trimUrl(candidate) {
    let url = candidate;
    for (;;) {
      const last = url.at(-1);
      const count = (c) => url.split(c).length - 1;
      if (TRAILING_PUNCTUATION.includes(last)) url = url.slice(0, -1);
      else if (last in CLOSERS && count(last) > count(CLOSERS[last])) url = url.slice(0, -1);
      else return url;
    }
  }

  // Only http: and https: with a host; anything else stays text.
  function safeHref(raw) {
    try {
      const url = new URL(raw);
      return (url.protocol === "http:" || url.protocol === "https:") && url.hostname ? url.href : null;
    } catch {
      return null;
    }
  }

  // The link's text as written, in parts: the scheme with "://", then one
  // part before each / ? & #, with a break opportunity (<wbr>) between them.
  // A part does not wrap inside (not even at a hyphen) unless it is too long
  // for a phone's line on its own.
  function linkNode(raw, href) {
    const a = document.createElement("a");
    a.href = href;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    const hostStart = raw.indexOf("://") + 3;
    const parts = [raw.slice(0, hostStart)];
    for (const c of raw.slice(hostStart)) {
      if (BREAK_BEFORE.includes(c) || parts.length === 1) parts.push(c);
      else parts[parts.length - 1] += c;
    }
    parts.forEach((part, i) => {
      if (i > 0) a.append(document.createElement("wbr"));
      if (part.length > UNBROKEN_URL_PART) {
        a.append(part);
      } else {
        const span = document.createElement("span");
        span.className = "url-part";
        span.textContent = part;
        a.append(span);
      }
    });
    return a;
  }

  function appendLinkified(parent, text) {
    let at = 0;
    for (const match of text.matchAll(URL_PATTERN)) {
      const raw = trimUrl(match[0]);
      const href = safeHref(raw);
      if (href === null) continue;
      if (match.index > at) parent.append(text.slice(at, match.index));
      parent.append(linkNode(raw, href));
      at = match.index + raw.length;
    }
    if (at < text.length) parent.append(text.slice(at));
  }

  // A long message shows about 12 lines until "Show more". Called once the
  // message is in the log, where it can be measured.
  let nextElementId = 0;
  const elementId = (prefix) => `${prefix}-${(nextElementId += 1)}`;

  function mayNeedClamp(item) {
    const text = item.querySelector(".msg-text").textContent;
    return text.length >= CLAMP_CHECK_CHARS || text.split("\n").length > CLAMP_CHECK_LINES;
  }

  function clampLongTexts(items) {
    const candidates = items.filter(mayNeedClamp).map((item) => item.querySelector(".msg-text"));
    for (const text of candidates) text.classList.add("is-clamped");
    // All measured after all classes are set: one layout for a whole page.
    const overflowing = candidates.filter((text) => text.scrollHeight > text.clientHeight + 1);
    for (const text of candidates) {
      if (!overflowing.includes(text)) text.classList.remove("is-clamped");
    }
    for (const text of overflowing) {
      text.id ||= elementId("msg-text");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "show-more";
      button.textContent = "Show more";
      button.setAttribute("aria-expanded", "false");
      button.setAttribute("aria-controls", text.id);
      button.addEventListener("click", () => {
        const expand = text.classList.contains("is-clamped");
        text.classList.toggle("is-clamped", !expand);
        button.textContent = expand ? "Show less" : "Show more";
        button.setAttribute("aria-expanded", String(expand));
      });
      text.after(button);
    }
  }

  // ------------------------------------------------------------ message log

  const seenIds = new Set();
  const ownIds = new Set(readOwnIds());
  let logItems = 0;
  // How many items the log holds before the oldest are trimmed. Loading older
  // pages raises it, so what the reader asked for is not trimmed from under
  // them; it drops back once they return to the bottom.
  let logCapacity = MAX_DOM_ITEMS;
  let olderAvailable = false; // may the server have messages older than the oldest shown?
  let loadingOlder = false;
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

  function dayDivider(day) {
    const heading = document.createElement("h2");
    heading.className = "day";
    heading.dataset.day = day;
    const time = document.createElement("time");
    time.dateTime = day;
    time.textContent = dayLabel(day);
    heading.append(time);
    return heading;
  }

  // Whether `item` goes under the header of `prev`: same named sender (two
  // anonymous messages may be two people), both ours or neither, same day,
  // within a few minutes.
  function continues(prev, item) {
    if (!prev || !item.dataset.sender || prev.dataset.sender !== item.dataset.sender) return false;
    if (prev.classList.contains("own") !== item.classList.contains("own") || !item.dataset.day) return false;
    if (prev.dataset.day !== item.dataset.day) return false;
    const gap = Number(item.dataset.ts) - Number(prev.dataset.ts);
    return gap >= 0 && gap <= GROUP_WINDOW_MS;
  }

  // The newest message in the log, and whether a notice came after it (a
  // notice ends a group).
  function lastMessage() {
    let broken = false;
    for (let el = ui.outbox.previousElementSibling; el; el = el.previousElementSibling) {
      if (el.classList.contains("msg")) return { prev: el, broken };
      if (el.classList.contains("notice")) broken = true;
    }
    return { prev: null, broken };
  }

  // Puts an item at the end of the log (above what waits to be sent), with a
  // day divider when a message starts a new day.
  function placeAtEnd(node) {
    if (node.classList.contains("msg")) {
      const { prev, broken } = lastMessage();
      const day = node.dataset.day;
      if (day && prev?.dataset.day !== day) ui.outbox.before(dayDivider(day));
      node.classList.toggle("msg-cont", !broken && continues(prev, node));
    }
    ui.outbox.before(node);
  }

  // Day dividers and groups over the whole log, after a page was added above
  // or the oldest items were trimmed: one divider before the first message of
  // each day, none left without a message under it.
  function layoutLog() {
    let lastDay = null;
    let prev = null;
    let divider = null; // a divider not yet followed by a message
    for (const el of [...ui.list.children]) {
      if (el.classList.contains("day")) {
        divider?.remove();
        divider = el;
      } else if (el.classList.contains("notice")) {
        prev = null;
      } else if (el.classList.contains("msg")) {
        const day = el.dataset.day;
        if (day && day !== lastDay) {
          if (divider?.dataset.day !== day) {
            divider?.remove();
            el.before(dayDivider(day));
          }
          lastDay = day;
        } else {
          divider?.remove();
        }
        divider = null;
        el.classList.toggle("msg-cont", continues(prev, el));
        prev = el;
      }
    }
    divider?.remove();
  }

  // "Today" becomes "Yesterday" at midnight.
  function relabelDays() {
    for (const heading of ui.list.querySelectorAll(".day")) {
      const label = dayLabel(heading.dataset.day);
      const time = heading.firstElementChild;
      if (time.textContent !== label) time.textContent = label;
    }
  }

  function relabelAtMidnight() {
    const now = new Date();
    const midnight = new Date(now.getFullYear(), now.getMonth(), now.getDate() + 1);
    setTimeout(() => {
      relabelDays();
      relabelAtMidnight();
    }, midnight - now + 1000);
  }

  function appendToLog(node, { forceScroll = false, counts = true } = {}) {
    // Decide before the node changes the geometry. `pinned` covers the case
    // where the composer grew and pushed the bottom out of reach since the
    // reader last scrolled.
    const stick = forceScroll || pinned || isNearBottom();
    placeAtEnd(node);
    logItems += 1;
    if (node.classList.contains("msg")) clampLongTexts([node]);
    trimLog(stick);
    if (stick) scrollToBottom();
    else if (counts) ui.jump.hidden = false;
  }

  function trimLog(stick) {
    if (logItems <= logCapacity) return;
    const heightBefore = ui.list.scrollHeight;
    while (logItems > logCapacity) {
      const oldest = ui.list.querySelector(".msg, .notice");
      if (!oldest) break;
      // What was trimmed can be loaded again.
      if (oldest.classList.contains("msg")) olderAvailable = true;
      oldest.remove();
      logItems -= 1;
    }
    layoutLog();
    updateLoadOlder();
    // Keep what the reader is looking at in place when content above it vanishes.
    if (!stick) ui.list.scrollTop -= heightBefore - ui.list.scrollHeight;
  }

  // `detail` (the server's reason, say) goes in the tooltip: the sentence
  // itself is written for the reader. Returns the notice, to be reworded.
  function addNotice(text, { detail = "", warn = false, announce = true } = {}) {
    const p = document.createElement("p");
    p.className = warn ? "notice notice-warn" : "notice";
    p.textContent = text;
    if (detail) p.title = detail;
    appendToLog(p, { counts: false });
    if (announce) say(text);
    return p;
  }

  function markOwn(id) {
    const el = ui.list.querySelector(`.msg[data-id="${CSS.escape(id)}"]`);
    if (el && !el.classList.contains("own")) {
      el.classList.add("own");
      layoutLog(); // ours now: no longer in another's group
    }
  }

  function buildMessage(env) {
    const own = ownIds.has(env.id);
    const item = document.createElement("article");
    item.className = own ? "msg own" : "msg";
    item.dataset.id = env.id;

    // The accessible name of the message is its sender; it then reads as
    // "name, time, text", in that order.
    const user = document.createElement("span");
    user.className = "msg-user";
    user.id = elementId("msg-user");
    item.setAttribute("aria-labelledby", user.id);
    const name = typeof env.user === "string" ? env.user.trim() : "";
    if (name) {
      user.textContent = name;
      user.title = name; // long names are ellipsised
      item.dataset.colour = String(colourOf(name));
    } else {
      user.textContent = "anonymous";
      user.classList.add("anon");
    }

    // Posted by a backend service with its API key: the key's name, as a badge.
    const from = typeof env.from === "string" ? env.from.trim() : "";
    let badge = null;
    if (from) {
      badge = document.createElement("span");
      badge.className = "msg-badge";
      badge.title = `Sent by the service "${from}" with its API key`;
      const said = document.createElement("span");
      said.className = "visually-hidden";
      said.textContent = "service ";
      badge.append(said, from);
    }
    // Who it is from, for grouping: the same name from a service's key is
    // another sender.
    if (name) item.dataset.sender = `${from}\u0000${name}`;

    const time = document.createElement("time");
    time.className = "msg-time";
    const when = new Date(typeof env.ts === "string" ? env.ts : NaN);
    if (Number.isNaN(when.getTime())) {
      time.textContent = "";
    } else {
      time.dateTime = env.ts;
      time.textContent = timeFormat.format(when);
      time.title = fullFormat.format(when);
      item.dataset.ts = String(when.getTime());
      item.dataset.day = dayKey(when);
    }

    const text = document.createElement("div");
    text.className = "msg-text";
    appendLinkified(text, env.text);

    if (badge) item.append(user, badge, time, text);
    else item.append(user, time, text);
    return item;
  }

  // A message that arrived (live, replayed after a reconnect, or our own):
  // it goes at the bottom and counts as unread in a background tab.
  function renderEnvelope(env) {
    if (seenIds.has(env.id)) return;
    remember(seenIds, env.id);

    const own = ownIds.has(env.id);
    const item = buildMessage(env);
    ui.empty.hidden = true;
    // Your own message always scrolls into view: you just sent it.
    appendToLog(item, { forceScroll: own });
    updateLoadOlder();
    if (!own) announceMessage(env);

    if (document.hidden && !own) {
      unread += 1;
      document.title = `(${unread}) ${baseTitle}`;
    }
  }

  // A page of history (oldest first) goes above everything shown: it is older
  // than what the socket delivered. Ids already in the log are skipped, but
  // not ids merely remembered: a message trimmed from the top comes back this
  // way. `hasMore`: whether the server has older ones still.
  function prependMessages(envelopes, hasMore) {
    const shown = (id) => ui.list.querySelector(`.msg[data-id="${CSS.escape(id)}"]`) !== null;
    const fragment = document.createDocumentFragment();
    const items = [];
    for (const env of envelopes) {
      if (shown(env.id)) continue;
      remember(seenIds, env.id);
      const item = buildMessage(env);
      item.classList.add("is-history"); // no arrival animation for a whole page
      fragment.append(item);
      items.push(item);
    }
    // Keep what the reader is looking at in place: the distance from the
    // bottom is what does not change when content is added above (the button
    // hiding itself included).
    const stick = pinned || isNearBottom();
    const fromBottom = ui.list.scrollHeight - ui.list.scrollTop;
    ui.loadOlder.after(fragment);
    logItems += items.length;
    logCapacity = Math.max(logCapacity, logItems);
    if (items.length > 0) ui.empty.hidden = true;
    layoutLog();
    clampLongTexts(items);
    // A page with nothing new would leave a button that never gets further.
    olderAvailable = hasMore && items.length > 0;
    updateLoadOlder();
    if (stick) scrollToBottom();
    else ui.list.scrollTop = ui.list.scrollHeight - fromBottom;
  }

  function updateLoadOlder() {
    ui.loadOlder.hidden = !(olderAvailable && ui.list.querySelector(".msg"));
  }

  // While a page of history is on its way the log is busy: a screen reader
  // waits for it rather than reading half a page.
  function setBusy(busy) {
    ui.list.setAttribute("aria-busy", String(busy));
  }

  function setLoadOlderLabel(text, busy) {
    ui.loadOlder.textContent = text;
    // aria-disabled rather than disabled: a disabled button drops keyboard focus.
    ui.loadOlder.setAttribute("aria-disabled", String(busy));
    setBusy(busy);
  }

  // GET /messages: `{ messages, hasMore, resume }`, or null when the server
  // could not be asked or did not answer with a page.
  async function fetchPage(params = {}) {
    const query = new URLSearchParams({ limit: String(PAGE_SIZE), ...params });
    const abort = new AbortController();
    const timeout = setTimeout(() => abort.abort(), HISTORY_TIMEOUT_MS);
    try {
      const res = await fetch(`/messages?${query}`, {
        headers: { Accept: "application/json" },
        cache: "no-store",
        signal: abort.signal,
      });
      if (!res.ok) return null;
      const data = await res.json();
      if (data === null || typeof data !== "object" || !Array.isArray(data.messages)) return null;
      const resume = typeof data.resume === "string" ? data.resume : null;
      return { messages: data.messages.filter(isEnvelope), hasMore: data.has_more === true, resume };
    } catch {
      return null;
    } finally {
      clearTimeout(timeout);
    }
  }

  async function loadOlder() {
    const oldest = ui.list.querySelector(".msg");
    if (loadingOlder || !oldest) return;
    loadingOlder = true;
    setLoadOlderLabel("Loading older messages…", true);
    const page = await fetchPage({ before: oldest.dataset.id });
    loadingOlder = false;
    if (page === null) {
      setLoadOlderLabel("Could not load older messages. Try again", false);
      return;
    }
    prependMessages(page.messages, page.hasMore);
    setLoadOlderLabel("Load older messages", false);
    // The button hides itself at the start of history; hand focus to the log
    // rather than <body>.
    if (ui.loadOlder.hidden && document.activeElement === document.body) {
      ui.list.focus({ preventScroll: true });
    }
  }

  ui.loadOlder.addEventListener("click", loadOlder);

  ui.list.addEventListener(
    "scroll",
    () => {
      pinned = isNearBottom();
      if (pinned) {
        ui.jump.hidden = true;
        // Back at the newest: the older pages may be trimmed again.
        logCapacity = MAX_DOM_ITEMS;
      }
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
  let starting = false; // the history fetch that precedes a socket is under way
  let suspended = false; // page is in the back/forward cache
  let everConnected = false;
  // Messages can flow: the socket is welcomed and the server has its broker.
  // Until then what the user sends waits in the outbox.
  let deliveryUp = false;
  // The id of the newest message the socket delivered (or the history page
  // ended with): every socket resumes after it. Ids rendered from a POST
  // answer do not move it, as the socket may still owe us messages published
  // just before ours.
  let cursor = null;

  function advanceCursor(id) {
    cursor = id;
    storeLastId(id);
  }

  function socketUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const since = cursor === null ? "" : `?since=${encodeURIComponent(cursor)}`;
    return `${scheme}//${location.host}/ws${since}`;
  }

  // The newest page of history, shown before the socket opens. Without it
  // (the server unreachable, or too old to keep history) the socket resumes
  // after what this tab showed before a reload, if it showed anything.
  async function loadLatest() {
    setBusy(true);
    const page = await fetchPage();
    if (page === null) {
      setBusy(false);
      cursor ??= readLastId();
      olderAvailable = true; // unknown: let the reader ask
      updateLoadOlder();
      return;
    }
    prependMessages(page.messages, page.hasMore);
    setBusy(false);
    const newest = page.messages.at(-1);
    if (newest) advanceCursor(newest.id);
    // An empty history still says where "now" is: the socket resumes from there, so a
    // message sent between this page and the socket is not missed.
    else if (page.resume) cursor = page.resume;
  }

  function cancelRetry() {
    clearTimeout(retryTimer);
    clearInterval(countdownTimer);
    retryTimer = 0;
    countdownTimer = 0;
  }

  // The connection is down and being retried: said once in the status, shown
  // in the bar with the countdown and a way to retry at once.
  const outageTitle = () => (everConnected ? "Connection lost." : "Cannot reach the server.");

  async function connect() {
    cancelRetry();
    if (socket || suspended || starting) return;
    if (ui.outage.hidden) {
      setStatus("connecting", "Connecting…");
    } else {
      setStatus("connecting", "Reconnecting", "…");
      showOutage({ title: outageTitle(), detail: "Reconnecting now…", retry: true });
      delete ui.outage.dataset.retryAt;
    }

    // Nothing to resume after yet: what the socket would not replay comes
    // from history instead. Once anything was shown, ?since= covers the rest.
    if (cursor === null) {
      starting = true;
      try {
        await loadLatest();
      } finally {
        starting = false;
      }
      if (socket || suspended) return;
    }

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
      deliveryUp = false;
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
    const cap = document.visibilityState === "visible" ? BACKOFF_VISIBLE_MAX_MS : BACKOFF_HIDDEN_MAX_MS;
    const ceiling = Math.min(cap, BACKOFF_MIN_MS * 2 ** attempt);
    attempt = Math.min(attempt + 1, 16);
    // "Equal jitter": at least half the ceiling, so a restarted server is not
    // hit by every tab in the same instant, yet no retry comes absurdly early.
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    const due = Date.now() + delay;
    ui.outage.dataset.retryAt = String(Math.round(due));

    const tick = () => {
      const seconds = Math.max(1, Math.ceil((due - Date.now()) / 1000));
      setStatus("reconnecting", "Reconnecting", ` in ${seconds} s`, detail);
      showOutage({ title: outageTitle(), detail: `Reconnecting in ${seconds} s.`, retry: true });
    };
    tick();
    countdownTimer = setInterval(tick, 250);
    retryTimer = setTimeout(connect, delay);
  }

  // "Retry now", the network coming back, the tab shown again: try at once,
  // giving up on an attempt that is still hanging.
  function reconnectNow() {
    if (suspended) return;
    if (socket && socket.readyState === WebSocket.CONNECTING && !ui.outage.hidden) {
      const stale = socket;
      socket = null;
      stale.close();
    }
    if (socket) return;
    attempt = 0;
    connect();
  }

  ui.retry.addEventListener("click", reconnectNow);

  function deliveryRestored(detail = "") {
    everConnected = true;
    deliveryUp = true;
    setStatus("connected", "Connected", "", detail);
    hideOutage();
    // An error about reaching the server is out of date now.
    clearError("network");
    flushOutbox();
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
      if (isEnvelope(frame)) {
        renderEnvelope(frame);
        advanceCursor(frame.id);
      }
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
        deliveryRestored(detail);
        // What was missed while away follows as ordinary messages (or a
        // replay gap notice first when the server no longer has all of it).
        break;
      }
      case "interrupted":
        deliveryUp = false;
        setStatus(
          "interrupted",
          "Delivery interrupted, waiting for the broker…",
          "",
          typeof frame.reason === "string" ? frame.reason : "",
        );
        showOutage({
          title: "Delivery interrupted.",
          detail: "The server lost its link to the message broker and is waiting for it to come back.",
          retry: false,
        });
        break;
      case "restored":
        deliveryRestored();
        break;
      case "gap": {
        // `replay_from` (even null) marks the answer to ?since=; a gap without
        // it is this session falling behind, or one oversized message.
        if ("replay_from" in frame) {
          const notice = addNotice(replayGapSentence(frame.replay_from), {
            detail: typeof frame.reason === "string" ? frame.reason : "",
            warn: true,
            announce: !singleProcess,
          });
          if (singleProcess) explainRestart(notice);
          break;
        }
        const missed = Number(frame.missed);
        const count =
          Number.isInteger(missed) && missed > 0
            ? `${missed} ${plural(missed, "message was", "messages were")}`
            : "Some messages were";
        // The server gives a reason when it skipped a message too large to send.
        addNotice(
          typeof frame.reason === "string" && frame.reason
            ? `${count} skipped (${frame.reason})`
            : `${count} skipped because this connection fell behind`,
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

  // The server could not replay all that this page missed: say so, and from
  // when the replay starts.
  function replayGapSentence(from) {
    const when = from && typeof from.ts === "string" ? new Date(from.ts) : null;
    if (when && !Number.isNaN(when.getTime())) {
      return `Some earlier messages are no longer available; showing from ${formatWhen(when)}.`;
    }
    return "Messages sent while this page was disconnected are no longer available.";
  }

  // A single process keeps its history in memory: when it restarted, the
  // history began again rather than losing what this page missed to age. It
  // did when its history holds every message it ever took (nothing was
  // dropped for room: `resume` counts them) and not the last one shown here.
  async function explainRestart(notice) {
    const page = await fetchPage({ limit: "500" });
    const taken = page?.resume?.startsWith("@") ? Number(page.resume.slice(1)) : NaN;
    if (page !== null && !page.hasMore && Number.isInteger(taken) && page.messages.length >= taken) {
      notice.textContent =
        "The server restarted, so its history began again: messages from before the restart are not kept.";
    }
    say(notice.textContent);
  }

  window.addEventListener("online", reconnectNow);

  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState !== "visible") return;
    unread = 0;
    document.title = baseTitle;
    relabelDays();
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
      deliveryUp = false;
      ws.close(1000, "page hidden");
    }
  });

  window.addEventListener("pageshow", (event) => {
    if (!event.persisted) return;
    suspended = false;
    reconnectNow();
  });

  // ------------------------------------------------------------ composer

  let errorKind = ""; // "", "limit", "server" or "network": which message owns the region
  let inFlight = false;
  let cooldownUntil = 0;
  let cooldownTimer = 0;
  let overLimit = false;
  let nameProblem = "";

  function showError(text, kind) {
    ui.error.textContent = text;
    errorKind = text ? kind : "";
  }

  function clearError(kind) {
    if (!kind || errorKind === kind) showError("", "");
  }

  function updateSendButton() {
    const coolingDown = Date.now() < cooldownUntil;
    ui.send.disabled = inFlight || overLimit || coolingDown || nameProblem !== "";
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

  // The server's rules for a name (src/chat.rs), checked as it is typed. The
  // rule counts bytes; people count characters, so that is what is said.
  function nameProblemOf(name) {
    if (name === "") return "";
    if (byteLength(name) > MAX_NAME_BYTES) {
      const chars = graphemes(name);
      let fit = 0;
      let used = 0;
      for (const c of chars) {
        used += byteLength(c);
        if (used > MAX_NAME_BYTES) break;
        fit += 1;
      }
      return `This name is too long: ${chars.length} characters, and ${fit} fit. Shorten it to send.`;
    }
    for (const c of name) {
      const code = c.codePointAt(0);
      if (code < 0x20 || (code >= 0x7f && code <= 0x9f)) {
        return "A name is one line of text: remove the control character.";
      }
      if (
        (code >= 0x202a && code <= 0x202e) ||
        (code >= 0x2066 && code <= 0x2069) ||
        code === 0x200e ||
        code === 0x200f ||
        code === 0x061c
      ) {
        return "Remove the text-direction character from the name: it can disguise a name.";
      }
    }
    return "";
  }

  function checkName() {
    nameProblem = nameProblemOf(ui.name.value.trim());
    if (nameProblem) ui.name.setAttribute("aria-invalid", "true");
    else ui.name.removeAttribute("aria-invalid");
    if (ui.nameError.textContent !== nameProblem) ui.nameError.textContent = nameProblem;
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

  // POST /messages: `{ res, data }`, or `{ failure: "timeout" | "network" }`.
  // An Idempotency-Key per message (not per attempt): when a POST times out or
  // fails, sending the same message again publishes it at most once.
  function newIdempotencyKey() {
    if (crypto.randomUUID) return crypto.randomUUID();
    // Pages served over plain http (not localhost) have no randomUUID.
    return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // The key of what is in the box: the same text and name sent again (after a
  // timeout, say) reuse it; anything else gets a new one.
  let boxKey = null;
  function keyForBox(payload) {
    if (!boxKey || boxKey.text !== payload.text || boxKey.user !== payload.user) {
      boxKey = { text: payload.text, user: payload.user, key: newIdempotencyKey() };
    }
    return boxKey.key;
  }

  async function postMessage(payload, idempotencyKey) {
    const key = `${payload.user ?? ""}\u0000${payload.text}`;
    sending.add(key);
    const abort = new AbortController();
    const timeout = setTimeout(() => abort.abort(), POST_TIMEOUT_MS);
    try {
      const res = await fetch("/messages", {
        method: "POST",
        headers: {
          "Content-Type": "application/json",
          Accept: "application/json",
          "Idempotency-Key": idempotencyKey,
        },
        body: JSON.stringify(payload),
        signal: abort.signal,
      });
      const data = await res.json().catch(() => null);
      return { res, data };
    } catch (err) {
      return { failure: err && err.name === "AbortError" ? "timeout" : "network" };
    } finally {
      clearTimeout(timeout);
      // Announcements are decided a moment after arrival: keep the key until then.
      setTimeout(() => sending.delete(key), ANNOUNCE_DELAY_MS * 2);
    }
  }

  // The server took our message: show it now, even if the socket is down or
  // slower than the POST; the id dedup drops whichever copy arrives second.
  function accepted(data) {
    if (!isEnvelope(data)) return;
    remember(ownIds, data.id);
    storeOwnIds(ownIds);
    // The WebSocket copy may have won the race; tag it after the fact.
    markOwn(data.id);
    renderEnvelope(data);
    scrollToBottom();
  }

  const refusal = (res, data) =>
    data && typeof data.error === "string" && data.error
      ? data.error
      : `The server refused the message (HTTP ${res.status}).`;

  // ------------------------------------------------------------ outbox

  // What the user sends while messages cannot flow waits here, in order, shown
  // under the log as "waiting", and goes out once the connection is back.
  const outbox = [];
  let flushing = false;
  let flushTimer = 0;

  function pendingButton(label, onClick) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = label;
    button.addEventListener("click", onClick);
    return button;
  }

  function setPendingState(entry, state, reason = "") {
    entry.state = state;
    entry.el.dataset.state = state;
    const line = entry.el.querySelector(".pending-state");
    if (state === "waiting") line.replaceChildren("Waiting for the connection: sent once it is back.");
    else if (state === "sending") line.replaceChildren("Sending…");
    else {
      line.replaceChildren(
        `Not sent: ${reason}`,
        pendingButton("Send again", () => {
          outbox.splice(outbox.indexOf(entry), 1);
          outbox.push(entry);
          ui.outbox.append(entry.el);
          setPendingState(entry, "waiting");
          flushOutbox();
        }),
        pendingButton("Remove", () => {
          outbox.splice(outbox.indexOf(entry), 1);
          entry.el.remove();
          ui.text.focus();
        }),
      );
    }
  }

  function enqueue(payload) {
    const el = document.createElement("div");
    el.className = "pending";
    const text = document.createElement("div");
    text.className = "pending-text";
    text.textContent = payload.text;
    const state = document.createElement("p");
    state.className = "pending-state";
    el.append(text, state);
    const entry = { payload, el, state: "", key: newIdempotencyKey() };
    setPendingState(entry, "waiting");
    outbox.push(entry);
    ui.outbox.append(el);
    ui.empty.hidden = true;
    scrollToBottom();
    say("Not connected: your message will be sent once the connection is back.");
  }

  function retryFlushIn(ms) {
    clearTimeout(flushTimer);
    flushTimer = setTimeout(flushOutbox, ms);
  }

  async function flushOutbox() {
    if (flushing) return;
    flushing = true;
    clearTimeout(flushTimer);
    try {
      for (;;) {
        const entry = outbox.find((e) => e.state === "waiting");
        if (!entry || !deliveryUp) return;
        setPendingState(entry, "sending");
        const { res, data, failure } = await postMessage(entry.payload, entry.key);
        if (res?.ok) {
          outbox.splice(outbox.indexOf(entry), 1);
          entry.el.remove();
          accepted(data);
        } else if (failure === "network" || (res && (res.status === 429 || res.status >= 500))) {
          // Not taken (or not confirmed in time: the same key makes the retry safe).
          // Wait, then try again in order.
          setPendingState(entry, "waiting");
          const wait = res?.status === 429 ? parseRetryAfter(res.headers.get("Retry-After")) : 0;
          retryFlushIn(Math.max(wait * 1000, OUTBOX_RETRY_MS));
          return;
        } else if (failure === "timeout") {
          setPendingState(entry, "failed", "the server did not answer, so it may or may not have arrived.");
        } else {
          setPendingState(entry, "failed", refusal(res, data));
        }
      }
    } finally {
      flushing = false;
    }
  }

  // ------------------------------------------------------------ sending

  async function send() {
    if (inFlight || Date.now() < cooldownUntil) return;
    const text = ui.text.value;
    if (text.trim() === "") {
      ui.text.focus();
      return;
    }
    if (nameProblem) {
      ui.name.focus();
      return;
    }
    const used = byteLength(text);
    if (used > maxBytes) {
      updateByteCount(); // shows the limit sentence; nothing is sent
      return;
    }

    const user = ui.name.value.trim();
    const payload = user ? { text, user } : { text };

    // Down, or earlier messages still waiting: this one waits too, after them.
    if (!deliveryUp || outbox.some((e) => e.state !== "failed")) {
      enqueue(payload);
      clearError("network"); // about the box's text, which now waits in the outbox
      ui.text.value = "";
      autosize();
      updateByteCount();
      flushOutbox();
      return;
    }

    inFlight = true;
    clearError("server");
    clearError("network");
    updateSendButton();
    try {
      const { res, data, failure } = await postMessage(payload, keyForBox(payload));
      if (failure) {
        showError(
          failure === "timeout"
            ? "The server did not answer in time. Your message is still in the box; try again."
            : "Could not reach the server. Your message is still in the box; try again.",
          "network",
        );
        return;
      }
      if (res.ok) {
        accepted(data);
        boxKey = null;
        // Only clear what was sent: the user may have kept typing meanwhile.
        if (ui.text.value === text) {
          ui.text.value = "";
          autosize();
          updateByteCount();
        }
        clearError("server");
        return;
      }
      let sentence = refusal(res, data);
      if (res.status === 429) {
        const wait = parseRetryAfter(res.headers.get("Retry-After"));
        if (wait > 0) sentence += ` You can send again in ${startCooldown(wait)} s.`;
      }
      showError(sentence, "server");
    } finally {
      inFlight = false;
      updateSendButton();
    }
  }

  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
    if (!nameProblem) ui.text.focus();
  });

  ui.text.addEventListener("keydown", (event) => {
    // isComposing: Enter confirms an IME candidate (Japanese, Chinese, …)
    // and must not send half-typed text. On a touch keyboard Enter is a new
    // line: the Send button is right there, and a half-written message is not
    // sent by a slip.
    if (event.key !== "Enter" || event.shiftKey || event.altKey || event.isComposing) return;
    if (touchKeyboard.matches) return;
    event.preventDefault();
    send();
  });

  ui.text.addEventListener("input", () => {
    // A complaint about the text as it was, or about sending it: editing answers it.
    clearError("server");
    clearError("network");
    autosize();
    updateByteCount();
  });

  ui.name.addEventListener("input", () => {
    checkName();
    storeName(ui.name.value.trim());
  });

  function followKeyboard() {
    if (touchKeyboard.matches) {
      ui.text.enterKeyHint = "enter";
      ui.hint.textContent = "Enter adds a new line; the Send button sends.";
    } else {
      ui.text.enterKeyHint = "send";
    }
  }

  touchKeyboard.addEventListener("change", followKeyboard);

  // ------------------------------------------------------------ banner

  // The single-process notice can be dismissed, for good in this browser.
  if (ui.banner) {
    if (readStorage(localStorage, BANNER_KEY) === "1") {
      ui.banner.hidden = true;
    } else {
      ui.bannerDismiss.hidden = false;
      ui.bannerDismiss.addEventListener("click", () => {
        ui.banner.hidden = true;
        writeStorage(localStorage, BANNER_KEY, "1");
        ui.text.focus();
      });
    }
  }

  // ------------------------------------------------------------ start

  ui.name.value = readStoredName();
  ui.curl.textContent = `curl -d text=hello ${location.origin}/messages`;
  followKeyboard();
  autosize();
  updateByteCount();
  checkName();
  relabelAtMidnight();
  // Ready to type; not on a touch screen, where focus would open the keyboard
  // over the log.
  if (!touchKeyboard.matches) ui.text.focus();
  connect();
})();
