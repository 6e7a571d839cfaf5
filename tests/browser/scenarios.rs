//! What people do with the page, each as a test.

use fanout_chat::config::ApiKeys;
use fantoccini::{Locator, key::Key};
use lapin::BasicProperties;
use serde_json::json;

use crate::{
    chaos::ChaosProxy,
    driver::{Driver, Page},
    helpers::{BusKind, TestApp, service, spawn_app, spawn_app_with, test_config},
};

pub const DESKTOP: (u32, u32) = (1280, 800);
pub const PHONE: (u32, u32) = (390, 844);
/// Chromium's flags for the dark colour scheme.
pub const DARK: [&str; 2] = ["--force-dark-mode", "--blink-settings=preferredColorScheme=0"];

pub async fn open(driver: &Driver, app: &TestApp, (width, height): (u32, u32)) -> Page {
    let page = driver.browser(width, height).await;
    page.open(&app.url("/")).await;
    page
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_chat_by_typing_and_pressing_enter() {
    let app = spawn_app(BusKind::Rabbit).await;
    let driver = Driver::start().await;
    let ada = open(&driver, &app, DESKTOP).await;
    let bob = open(&driver, &app, DESKTOP).await;

    ada.type_into("name", "Ada").await;
    ada.type_into("text", "Hello Bob, are you there?").await;
    ada.press_enter_in_message_box().await;

    let (at_bob, took) = bob.wait_for_message("Hello Bob, are you there?").await;
    assert!(took.as_millis() < 1000, "the message reached the other browser within a second, took {took:?}");
    let (at_ada, _) = ada.wait_for_message("Hello Bob, are you there?").await;
    assert_eq!((at_bob.user.as_str(), at_ada.user.as_str()), ("Ada", "Ada"));
    assert_eq!(at_bob.id, at_ada.id);
    assert!(at_bob.time.contains(':'), "a local time is shown: {:?}", at_bob.time);
    assert!(at_ada.own && !at_bob.own, "only the sender sees it as their own");
    assert_eq!(
        ada.eval("document.getElementById('text').value").await,
        "",
        "the box is cleared after sending"
    );
    assert_eq!(ada.messages().await.len(), 1, "shown once, though it came back by POST and WebSocket");

    bob.type_into("name", "Bob").await;
    bob.type_into("text", "Yes! Hi Ada.").await;
    bob.press_enter_in_message_box().await;
    let (reply, _) = ada.wait_for_message("Yes! Hi Ada.").await;
    assert_eq!(reply.user, "Bob");
    ada.screenshot("1-two-people-ada").await;
    bob.screenshot("1-two-people-bob").await;

    // The name is remembered across a reload, and so is which messages were Ada's own.
    ada.open(&app.url("/")).await;
    assert_eq!(ada.eval("document.getElementById('name').value").await, "Ada");
    let (mine, _) = ada.wait_for_message("Hello Bob, are you there?").await;
    let (theirs, _) = ada.wait_for_message("Yes! Hi Ada.").await;
    assert!(mine.own && !theirs.own, "after a reload, still shown as Ada's own");
    ada.close().await;
    bob.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_from_curl_and_from_another_service_appear() {
    let app = spawn_app(BusKind::Rabbit).await;
    let driver = Driver::start().await;
    let page = open(&driver, &app, DESKTOP).await;

    let response = app.post_form("text=deployed+v2+from+curl&user=ci").await;
    assert_eq!(response.status(), 202);
    let (from_curl, _) = page.wait_for_message("deployed v2 from curl").await;
    assert_eq!(from_curl.user, "ci");

    let service = service().await;
    service
        .publish(
            app.exchange(),
            b"Invoice 42 was paid",
            BasicProperties::default().with_app_id("billing".into()),
        )
        .await;
    let (from_service, _) = page.wait_for_message("Invoice 42 was paid").await;
    assert_eq!(from_service.user, "billing");
    assert!(!from_service.own);
    page.screenshot("2-curl-and-service").await;
    page.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_posted_with_a_service_key_shows_the_service_badge() {
    let mut config = test_config(BusKind::Rabbit);
    config.access.api_keys = ApiKeys::read(Some("deploys:d3pl0y-k3y-for-the-browser-test"), None).unwrap();
    let app = spawn_app_with(config).await;
    let driver = Driver::start().await;
    let page = open(&driver, &app, DESKTOP).await;

    let response = app
        .http
        .post(app.url("/messages"))
        .bearer_auth("d3pl0y-k3y-for-the-browser-test")
        .json(&json!({ "text": "v2.4.1 is live", "user": "release bot" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let (keyed, _) = page.wait_for_message("v2.4.1 is live").await;
    assert_eq!(keyed.user, "release bot");
    assert_eq!(keyed.badge.as_deref(), Some("service deploys"), "the badge names the key");
    app.post_json(json!({ "text": "nice", "user": "Ada" })).await;
    let (person, _) = page.wait_for_message("nice").await;
    assert_eq!(person.badge, None, "a person's message has no badge");
    page.screenshot("service-badge").await;
    page.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_that_looks_like_markup_shows_as_text_and_runs_nothing() {
    let app = spawn_app(BusKind::Rabbit).await;
    let driver = Driver::start().await;
    let page = open(&driver, &app, DESKTOP).await;
    let attacks = [
        r#"<img src=x onerror="window.__pwned = 'img'">"#,
        r#"<script>window.__pwned = 'script'</script>"#,
        r#"<b onmouseover="window.__pwned = 'b'">bold?</b> &amp; &lt;"#,
    ];
    for attack in attacks {
        app.post_json(json!({ "text": attack, "user": "<i>mallory</i>" })).await;
    }
    // Typed in the page too, not only posted.
    page.type_into("text", r#"<img src=y onerror="window.__pwned = 'typed'">"#).await;
    page.press_enter_in_message_box().await;
    for attack in attacks {
        let (shown, _) = page.wait_for_message(attack).await;
        assert_eq!(shown.user, "<i>mallory</i>");
    }
    page.wait_for_message(r#"<img src=y onerror="window.__pwned = 'typed'">"#).await;
    assert_eq!(
        page.eval("document.querySelectorAll('#messages .msg-text *, #messages .msg-user *').length").await,
        0
    );
    assert_eq!(page.eval("document.querySelectorAll('#messages img, #messages script').length").await, 0);
    assert_eq!(page.eval("window.__pwned === undefined").await, true, "no script ran");
    page.screenshot("3-markup-as-text").await;
    page.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicode_and_a_message_at_the_limit_round_trip_and_one_over_is_refused_in_the_page() {
    let app = spawn_app(BusKind::Rabbit).await;
    let driver = Driver::start().await;
    let page = open(&driver, &app, DESKTOP).await;
    let other = open(&driver, &app, PHONE).await;

    let unicode = "emoji 👋🎉🏳️‍🌈, RTL مرحبا بالعالم, CJK 你好世界, combining é";
    page.paste_message(unicode).await;
    page.press_enter_in_message_box().await;
    let (shown, _) = other.wait_for_message(unicode).await;
    assert_eq!(shown.text, unicode, "exactly as sent");
    other.screenshot("4-unicode-phone").await;

    let limit = app.config.messages.max_bytes;
    let at_limit = "é".repeat(limit / 2);
    page.paste_message(&at_limit).await;
    assert_eq!(page.eval("document.getElementById('send').disabled").await, false);
    page.press_enter_in_message_box().await;
    other.wait_for_message(&at_limit).await;

    let over = format!("{at_limit}x");
    page.paste_message(&over).await;
    assert_eq!(page.eval("document.getElementById('byte-count').dataset.level").await, "over");
    assert_eq!(page.eval("document.getElementById('send').disabled").await, true);
    page.wait_until(
        "the page to say the message is too long",
        &format!("document.getElementById('composer-error').textContent.includes('{limit} bytes')"),
    )
    .await;
    page.press_enter_in_message_box().await;
    page.screenshot("4-over-the-limit").await;
    // Nothing was sent: the next message either page sees is the next one posted.
    app.post_text("after the refused one").await;
    other.wait_for_message("after the refused one").await;
    let texts: Vec<String> = other.messages().await.into_iter().map(|m| m.text).collect();
    assert_eq!(texts, [unicode.to_owned(), at_limit.clone(), "after the refused one".to_owned()]);
    assert_eq!(
        page.eval("document.getElementById('text').value.length").await,
        json!(over.chars().count()),
        "the text is kept"
    );
    page.close().await;
    other.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_follows_the_server_and_the_page_reconnects_by_itself() {
    let app = spawn_app(BusKind::Rabbit).await;
    let config = app.config.clone();
    let addr = app.addr;
    let driver = Driver::start().await;
    let page = open(&driver, &app, DESKTOP).await;
    assert_eq!(page.eval("document.getElementById('status').textContent.trim()").await, "Connected");
    app.post_text("before the restart").await;
    page.wait_for_message("before the restart").await;

    app.stop().await;
    page.wait_for_state("reconnecting").await;
    assert!(
        page.eval("document.getElementById('status').textContent")
            .await
            .as_str()
            .unwrap()
            .contains("Reconnecting")
    );
    page.screenshot("5-server-gone").await;

    // The same server comes back on the same address.
    let mut config = config;
    config.port = addr.port();
    let app = spawn_app_with(config).await;
    page.wait_for_state("connected").await;
    app.post_text("back again").await;
    page.wait_for_message("back again").await;
    // The new process resumed the page after its last message: nothing twice, nothing missing.
    assert_eq!(page.texts().await, ["before the restart", "back again"]);
    page.screenshot("5-reconnected").await;
    page.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_phone_width_every_control_is_visible_and_usable() {
    let app = spawn_app(BusKind::Rabbit).await;
    let driver = Driver::start().await;
    let page = open(&driver, &app, PHONE).await;
    assert_eq!(page.eval("window.innerWidth").await, PHONE.0);
    assert_eq!(
        page.eval("document.documentElement.scrollWidth <= window.innerWidth").await,
        true,
        "no horizontal scrolling"
    );
    for id in ["status", "name", "text", "send"] {
        let inside = page
            .eval(&format!(
                "(() => {{ const r = document.getElementById('{id}').getBoundingClientRect();
                    return r.width > 0 && r.height > 0 && r.left >= 0 && r.top >= 0
                        && r.right <= window.innerWidth && r.bottom <= window.innerHeight; }})()"
            ))
            .await;
        assert_eq!(inside, true, "#{id} is fully on screen");
    }
    // Usable by touch: tap the button rather than pressing Enter.
    page.type_into("name", "Phone").await;
    page.type_into("text", "sent from a phone").await;
    page.client.find(fantoccini::Locator::Id("send")).await.unwrap().click().await.unwrap();
    let (shown, _) = page.wait_for_message("sent from a phone").await;
    assert!(shown.own);
    page.screenshot("6-phone").await;
    page.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keyboard_alone_reaches_every_control_in_order() {
    let app = spawn_app(BusKind::Memory).await;
    let driver = Driver::start().await;
    let page = open(&driver, &app, DESKTOP).await;
    assert_eq!(page.eval("document.activeElement.id").await, "text", "the message box has focus on load");
    // Start from the top, as a click on the title does: Tab then goes through the page in order.
    page.client.find(Locator::Css(".app-title")).await.unwrap().click().await.unwrap();
    let mut order = Vec::new();
    for _ in 0..4 {
        page.client
            .active_element()
            .await
            .unwrap()
            .send_keys(&fantoccini::key::Key::Tab.to_string())
            .await
            .unwrap();
        order.push(page.eval("document.activeElement.id").await.as_str().unwrap().to_owned());
    }
    assert_eq!(
        order,
        ["mode-banner-dismiss", "messages", "name", "text"],
        "focus goes from the single-process notice's button to the message list, the name, then the message"
    );
    page.client.active_element().await.unwrap().send_keys("typed without a mouse").await.unwrap();
    page.press_enter_in_message_box().await;
    page.wait_for_message("typed without a mouse").await;
    page.screenshot("7-keyboard-memory-mode").await;
    page.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_follows_the_dark_colour_scheme() {
    let app = spawn_app_with(test_config(BusKind::Rabbit)).await;
    let driver = Driver::start().await;
    let page = open(&driver, &app, DESKTOP).await;
    let light = page.eval("getComputedStyle(document.body).backgroundColor").await;
    page.close().await;
    let page =
        driver.browser_with(DESKTOP, &["--force-dark-mode", "--blink-settings=preferredColorScheme=0"]).await;
    page.open(&app.url("/")).await;
    assert_eq!(page.eval("matchMedia('(prefers-color-scheme: dark)').matches").await, true);
    let dark = page.eval("getComputedStyle(document.body).backgroundColor").await;
    assert_ne!(light, dark, "the background changes with the colour scheme");
    app.post_text("dark mode check").await;
    page.wait_for_message("dark mode check").await;
    page.screenshot("8-dark").await;
    page.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_follows_new_messages_only_while_the_reader_is_at_the_bottom() {
    let app = spawn_app(BusKind::Rabbit).await;
    let driver = Driver::start().await;
    let page = open(&driver, &app, DESKTOP).await;
    for n in 0..40 {
        app.post_text(&format!("filler {n} with a word that is very long: {}", "x".repeat(120))).await;
    }
    page.wait_for_message(&format!("filler 39 with a word that is very long: {}", "x".repeat(120))).await;
    let at_bottom = "(() => { const m = document.getElementById('messages');
        return m.scrollHeight - m.scrollTop - m.clientHeight < 2; })()";
    assert_eq!(page.eval(at_bottom).await, true, "at the bottom, the list follows new messages");
    assert_eq!(
        page.eval("document.documentElement.scrollWidth <= window.innerWidth").await,
        true,
        "long words wrap instead of widening the page"
    );

    // The reader scrolls up to read: a new message must not pull them down.
    // Scroll as a reader does, and wait until the page has seen the scroll event.
    page.client
        .execute_async(
            "const done = arguments[arguments.length - 1];
             const list = document.getElementById('messages');
             list.addEventListener('scroll', () => setTimeout(done, 0), { once: true });
             list.scrollTop = 0;",
            vec![],
        )
        .await
        .unwrap();
    app.post_text("while reading older ones").await;
    page.wait_for_message("while reading older ones").await;
    assert_eq!(page.eval("document.getElementById('messages').scrollTop").await, 0, "the reader stays put");
    assert_eq!(page.eval("document.getElementById('jump').hidden").await, false, "a jump button is offered");
    page.screenshot("9-reading-older").await;

    page.client.find(fantoccini::Locator::Id("jump")).await.unwrap().click().await.unwrap();
    page.wait_until("the list to be at the bottom again", at_bottom).await;
    page.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_when_delivery_is_interrupted_by_the_broker_and_when_it_is_back() {
    let proxy = crate::chaos::ChaosProxy::start(
        format!("{}:{}", crate::helpers::AMQP_HOST, crate::helpers::AMQP_PORT).parse().unwrap(),
    )
    .await;
    let mut config = test_config(BusKind::Rabbit);
    config.rabbitmq.as_mut().unwrap().port = proxy.port();
    let app = spawn_app_with(config).await;
    let driver = Driver::start().await;
    let page = open(&driver, &app, DESKTOP).await;

    proxy.cut().await;
    page.wait_for_state("interrupted").await;
    let status = page.eval("document.getElementById('status').textContent").await;
    assert!(status.as_str().unwrap().contains("interrupted"), "{status}");
    page.screenshot("10-broker-interrupted").await;

    proxy.restore().await;
    page.wait_for_state("connected").await;
    app.wait_until_ready().await;
    app.post_text("delivered again").await;
    page.wait_for_message("delivered again").await;
    page.close().await;
    app.stop().await;
}

/// Waits until the app's history (`GET /messages`) ends with `newest`: on RabbitMQ the window
/// is filled from the history stream, a few milliseconds behind the publish.
pub async fn wait_for_history(app: &TestApp, newest: &str) {
    let deadline = std::time::Instant::now() + crate::helpers::WAIT;
    loop {
        let page: serde_json::Value =
            app.http.get(app.url("/messages?limit=500")).send().await.unwrap().json().await.unwrap();
        if page["messages"].as_array().and_then(|m| m.last()).is_some_and(|m| m["text"] == newest) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "GET /messages does not end with {newest:?}: {page}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

const LOAD_OLDER_HIDDEN: &str = "document.getElementById('load-older').hidden";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_opened_later_shows_what_was_said_before_in_order() {
    let app = spawn_app(BusKind::Rabbit).await;
    app.post_json(json!({ "text": "Morning all, standup in 5", "user": "Ada" })).await;
    app.post_json(json!({ "text": "On my way", "user": "Bob" })).await;
    let service = service().await;
    // With confirms, the publish below is on the broker before the next POST: the order is set.
    service
        .publish(app.exchange(), b"Nightly build passed", BasicProperties::default().with_app_id("ci".into()))
        .await;
    app.post_json(json!({ "text": "Starting now" })).await;
    wait_for_history(&app, "Starting now").await;
    let earlier = ["Morning all, standup in 5", "On my way", "Nightly build passed", "Starting now"];

    let driver = Driver::start().await;
    let page = open(&driver, &app, DESKTOP).await;
    page.wait_for_count(earlier.len()).await;
    let shown = page.messages().await;
    let texts: Vec<&str> = shown.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, earlier, "the earlier messages, oldest first");
    let users: Vec<&str> = shown.iter().map(|m| m.user.as_str()).collect();
    assert_eq!(users, ["Ada", "Bob", "ci", "anonymous"]);
    assert!(shown.iter().all(|m| m.time.contains(':') && !m.own), "{shown:?}");
    assert_eq!(page.eval(LOAD_OLDER_HIDDEN).await, true, "nothing older to load");
    assert_eq!(page.eval("document.getElementById('empty').hidden").await, true, "no 'No messages yet'");
    assert!(page.at_bottom().await);

    // Live messages follow them, and nothing shows twice.
    app.post_text("after the page opened").await;
    page.wait_for_message("after the page opened").await;
    let everything: Vec<String> =
        earlier.iter().map(|t| t.to_string()).chain(["after the page opened".into()]).collect();
    assert_eq!(page.texts().await, everything);
    page.screenshot("11-history-on-load").await;

    // A reload shows the same conversation, once.
    page.open(&app.url("/")).await;
    page.wait_for_count(everything.len()).await;
    assert_eq!(page.texts().await, everything, "after a reload");

    let phone = open(&driver, &app, PHONE).await;
    phone.wait_for_count(everything.len()).await;
    assert_eq!(phone.texts().await, everything, "at phone width");
    phone.screenshot("11-history-on-load-phone").await;
    phone.close().await;
    page.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_messages_load_above_without_moving_what_the_reader_sees() {
    let app = spawn_app(BusKind::Rabbit).await;
    let text = |n: usize| format!("message {n:03}");
    for n in 1..=120 {
        app.post_text(&text(n)).await;
    }
    wait_for_history(&app, &text(120)).await;
    let range = |from: usize| (from..=120).map(text).collect::<Vec<_>>();

    let driver = Driver::start().await;
    let page = open(&driver, &app, DESKTOP).await;
    page.wait_for_count(50).await;
    assert_eq!(page.texts().await, range(71), "the newest 50, oldest first");
    assert!(page.at_bottom().await, "the newest message is in view");
    assert_eq!(page.eval(LOAD_OLDER_HIDDEN).await, false, "older messages are offered");

    // The reader scrolls to the top and clicks the button.
    page.scroll_list_to(0).await;
    page.screenshot("12-load-older-button").await;
    let before = page.top_of_message(&text(71)).await;
    page.client.find(Locator::Id("load-older")).await.unwrap().click().await.unwrap();
    page.wait_for_count(100).await;
    assert_eq!(page.texts().await, range(21), "the older page above, in order");
    let after = page.top_of_message(&text(71)).await;
    assert!((after - before).abs() < 2.0, "what the reader was looking at stays put: {before} → {after}");
    assert_eq!(page.eval(LOAD_OLDER_HIDDEN).await, false, "still more to load");
    page.screenshot("12-load-older-first-page").await;

    // The rest by keyboard: Tab from the message list reaches the button, Enter presses it.
    page.eval("document.getElementById('messages').focus() || true").await;
    page.client.active_element().await.unwrap().send_keys(&Key::Tab.to_string()).await.unwrap();
    assert_eq!(page.eval("document.activeElement.id").await, "load-older");
    let before = page.top_of_message(&text(21)).await;
    page.client.active_element().await.unwrap().send_keys(&Key::Enter.to_string()).await.unwrap();
    page.wait_for_count(120).await;
    assert_eq!(page.texts().await, range(1), "the whole conversation, in order");
    page.wait_until("the button to go at the start of the conversation", LOAD_OLDER_HIDDEN).await;
    let after = page.top_of_message(&text(21)).await;
    assert!((after - before).abs() < 2.0, "what the reader was looking at stays put: {before} → {after}");
    assert_eq!(page.eval("document.activeElement.id").await, "messages", "focus stays in the list");
    page.scroll_list_to(0).await;
    page.screenshot("12-load-older-start").await;

    // A new message still arrives at the bottom, once.
    app.post_text("new at the end").await;
    page.wait_for_message("new at the end").await;
    assert_eq!(page.texts().await.len(), 121);

    // At phone width the button fits, and works by touch.
    let phone = open(&driver, &app, PHONE).await;
    phone.wait_for_count(50).await;
    phone.scroll_list_to(0).await;
    let fits = "(() => { const r = document.getElementById('load-older').getBoundingClientRect();
        return r.width > 0 && r.left >= 0 && r.right <= window.innerWidth; })()";
    assert_eq!(phone.eval(fits).await, true, "the button is fully on screen");
    phone.screenshot("12-load-older-phone").await;
    phone.client.find(Locator::Id("load-older")).await.unwrap().click().await.unwrap();
    phone.wait_for_count(100).await;
    let newest_hundred: Vec<String> = (22..=120).map(text).chain(["new at the end".to_owned()]).collect();
    assert_eq!(phone.texts().await, newest_hundred);
    phone.close().await;
    page.close().await;
    app.stop().await;
}

/// The page's traffic goes through a proxy of the test's own, so its network can drop while
/// the app goes on serving everyone else.
pub async fn open_through(driver: &Driver, proxy: &ChaosProxy, size: (u32, u32), flags: &[&str]) -> Page {
    let page = driver.browser_with(size, flags).await;
    page.open(&format!("http://127.0.0.1:{}/", proxy.port())).await;
    page
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_network_drop_the_page_shows_exactly_what_it_missed() {
    let app = spawn_app(BusKind::Rabbit).await;
    let proxy = ChaosProxy::start(app.addr).await;
    let driver = Driver::start().await;
    let page = open_through(&driver, &proxy, DESKTOP, &[]).await;
    app.post_text("before the drop").await;
    page.wait_for_message("before the drop").await;

    proxy.cut().await;
    page.wait_for_state("reconnecting").await;
    let mut missed = Vec::new();
    for text in ["missed one", "missed two", "missed three"] {
        missed.push(app.post_text(text).await["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(page.texts().await, ["before the drop"], "nothing arrives while the network is down");
    page.screenshot("13-network-down").await;

    proxy.restore().await;
    page.wait_for_state("connected").await;
    page.wait_for_count(4).await;
    let shown = page.messages().await;
    let texts: Vec<&str> = shown.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["before the drop", "missed one", "missed two", "missed three"]);
    let ids: Vec<&str> = shown[1..].iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, missed, "the very messages that were posted");
    assert_eq!(page.notices().await, Vec::<String>::new(), "nothing is reported missing");

    // Live again, with no second copy of anything replayed.
    app.post_text("live again").await;
    page.wait_for_message("live again").await;
    assert_eq!(
        page.texts().await,
        ["before the drop", "missed one", "missed two", "missed three", "live again"]
    );
    page.screenshot("13-caught-up").await;
    page.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_away_longer_than_the_history_kept_says_what_is_gone() {
    let mut config = test_config(BusKind::Memory);
    config.history.window = 5;
    let app = spawn_app_with(config).await;
    let proxy = ChaosProxy::start(app.addr).await;
    let driver = Driver::start().await;
    let dark = ["--force-dark-mode", "--blink-settings=preferredColorScheme=0"];
    let page = open_through(&driver, &proxy, DESKTOP, &dark).await;
    app.post_text("seen before the drop").await;
    page.wait_for_message("seen before the drop").await;

    proxy.cut().await;
    page.wait_for_state("reconnecting").await;
    for n in 1..=8 {
        app.post_text(&format!("away {n}")).await;
    }
    proxy.restore().await;
    page.wait_for_state("connected").await;
    page.wait_for_message("away 8").await;
    let expected = ["seen before the drop", "away 4", "away 5", "away 6", "away 7", "away 8"];
    assert_eq!(page.texts().await, expected, "the server keeps the last 5: those are shown");
    let (first_replayed, _) = page.wait_for_message("away 4").await;
    let notices = page.notices().await;
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(
        notices[0].contains("no longer available") && notices[0].contains(&first_replayed.time),
        "the notice says some are gone, and from when the page shows: {notices:?}"
    );
    // The notice sits between what was seen and what was replayed.
    let order = page
        .eval(
            "[...document.querySelectorAll('#messages .msg, #messages .notice')]
                .map(e => e.classList.contains('notice') ? 'notice' : e.querySelector('.msg-text').textContent)",
        )
        .await;
    assert_eq!(
        order,
        json!(["seen before the drop", "notice", "away 4", "away 5", "away 6", "away 7", "away 8"])
    );
    page.screenshot("14-replay-gap-dark").await;

    let phone = open_through(&driver, &proxy, PHONE, &dark).await;
    phone.wait_for_count(5).await;
    assert_eq!(phone.texts().await, expected[1..], "a new page shows the history kept");
    phone.screenshot("14-history-dark-phone").await;
    phone.close().await;
    page.close().await;
    app.stop().await;
}
