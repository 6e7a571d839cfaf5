//! What people do with the page, each as a test.

use lapin::{BasicProperties, options::BasicPublishOptions};
use serde_json::json;

use crate::{
    driver::{Driver, Page},
    helpers::{BusKind, TestApp, service, spawn_app, spawn_app_with, test_config},
};

const DESKTOP: (u32, u32) = (1280, 800);
const PHONE: (u32, u32) = (390, 844);

async fn open(driver: &Driver, app: &TestApp, (width, height): (u32, u32)) -> Page {
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

    // The name is remembered across a reload.
    ada.open(&app.url("/")).await;
    assert_eq!(ada.eval("document.getElementById('name').value").await, "Ada");
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
        .channel
        .basic_publish(
            app.exchange().into(),
            "".into(),
            BasicPublishOptions::default(),
            b"Invoice 42 was paid",
            BasicProperties::default().with_app_id("billing".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let (from_service, _) = page.wait_for_message("Invoice 42 was paid").await;
    assert_eq!(from_service.user, "billing");
    assert!(!from_service.own);
    page.screenshot("2-curl-and-service").await;
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

    let limit = app.config.max_message_bytes;
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
    page.eval("document.activeElement.blur() || true").await;
    let mut order = Vec::new();
    for _ in 0..3 {
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
        ["messages", "name", "text"],
        "focus goes from the message list to the name, then the message"
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
