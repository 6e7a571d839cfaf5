//! The page for screen readers and axe-core: what is announced, what each message is called,
//! landmarks, and axe's checks with no violation in three states (empty, with messages, dark).

use serde_json::json;

use crate::{
    driver::{Driver, Page},
    helpers::{BusKind, TestApp, service, spawn_app},
    reading::{local_time, publish_at},
    scenarios::{DARK, DESKTOP, open, wait_for_history},
};

const ANNOUNCED: &str = "document.getElementById('announcer').textContent";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn screen_readers_hear_what_others_write_not_their_own_nor_pages_of_history() {
    let app = spawn_app(BusKind::Rabbit).await;
    for n in 1..=60 {
        app.post_json(json!({ "text": format!("history {n}"), "user": "Cy" })).await;
    }
    wait_for_history(&app, "history 60").await;
    let driver = Driver::start().await;
    let ada = open(&driver, &app, DESKTOP).await;
    let bob = open(&driver, &app, DESKTOP).await;
    bob.wait_for_count(50).await;
    assert_eq!(bob.eval(ANNOUNCED).await, "", "a page of history is not read out");
    assert_eq!(bob.eval("document.getElementById('messages').getAttribute('aria-busy')").await, "false");

    ada.type_into("name", "Ada").await;
    ada.type_into("text", "Hello from Ada").await;
    ada.press_enter_in_message_box().await;
    bob.wait_until(
        "Bob's page to say Ada's message",
        &format!("{ANNOUNCED}.includes('Ada: Hello from Ada')"),
    )
    .await;
    ada.wait_for_message("Hello from Ada").await;
    // Give Ada's page the time it takes to announce (it batches for 400 ms): still nothing.
    bob.type_into("name", "Bob").await;
    bob.type_into("text", "Hi Ada").await;
    bob.press_enter_in_message_box().await;
    ada.wait_until("Ada's page to say Bob's message", &format!("{ANNOUNCED}.includes('Bob: Hi Ada')")).await;
    assert!(
        !ada.eval(ANNOUNCED).await.as_str().unwrap().contains("Hello from Ada"),
        "one's own message is not read out"
    );

    // Each message is named by its sender, and reads "name, time, text".
    let named = bob
        .eval(
            "[...document.querySelectorAll('#messages .msg')].slice(-2).map(m => [
                document.getElementById(m.getAttribute('aria-labelledby')).textContent,
                [...m.children].map(c => c.className)])",
        )
        .await;
    assert_eq!(
        named,
        json!([["Ada", ["msg-user", "msg-time", "msg-text"]], ["Bob", ["msg-user", "msg-time", "msg-text"]]])
    );

    // The status is announced, and sits in a landmark like every control.
    assert_eq!(bob.eval("document.getElementById('status').getAttribute('role')").await, "status");
    assert_eq!(
        bob.eval(
            "[...document.querySelectorAll('button, input, textarea, a, [role=status], [role=log]')]
                .filter(e => !e.closest('header, main')).map(e => e.id || e.tagName)"
        )
        .await,
        json!([]),
        "every control sits in a landmark"
    );

    // Loading older messages: the log is busy until the page is in.
    bob.eval(
        "(() => { const real = window.fetch;
            window.fetch = (...a) => new Promise(r => setTimeout(() => r(real(...a)), 2000)); return true; })()",
    )
    .await;
    bob.scroll_list_to(0).await;
    bob.click("#load-older").await;
    assert_eq!(bob.eval("document.getElementById('messages').getAttribute('aria-busy')").await, "true");
    bob.wait_for_count(62).await;
    bob.wait_until(
        "the log not to be busy",
        "document.getElementById('messages').getAttribute('aria-busy') === 'false'",
    )
    .await;
    assert!(!bob.eval(ANNOUNCED).await.as_str().unwrap().contains("history"), "older pages are not read out");
    ada.close().await;
    bob.close().await;
    app.stop().await;
}

async fn no_violations(page: &Page, state: &str) {
    let violations = page.axe_violations().await;
    assert!(violations.is_empty(), "axe-core, {state}: {violations:#?}");
}

/// A conversation with what the page can show: links, a group, days, a long message, one's own.
async fn converse(app: &TestApp, page: &Page) {
    let service = service().await;
    let yesterday = local_time(page, 1, 18, 5).await;
    publish_at(
        &service,
        app,
        "ops",
        "Nightly backup done: https://example.test/backups?day=1#log",
        &yesterday,
    )
    .await;
    for text in ["Morning!", "Standup in 5", "Notes: https://example.test/notes/standup"] {
        app.post_json(json!({ "text": text, "user": "Ada" })).await;
    }
    app.post_json(json!({ "text": "On my way\n".repeat(30), "user": "Bob" })).await;
    app.post_json(json!({ "text": "anonymous hello" })).await;
    page.type_into("text", "My own message").await;
    page.press_enter_in_message_box().await;
    page.wait_for_message("My own message").await;
    page.wait_for_count(7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axe_finds_no_violation_empty_with_messages_and_dark() {
    let driver = Driver::start().await;

    // Empty, on the embedded bus: with the single-process notice.
    let single = spawn_app(BusKind::Memory).await;
    let page = open(&driver, &single, DESKTOP).await;
    no_violations(&page, "empty, single-process").await;
    page.screenshot("27-6-axe-empty").await;
    page.close().await;
    single.stop().await;

    let app = spawn_app(BusKind::Rabbit).await;
    let page = open(&driver, &app, DESKTOP).await;
    no_violations(&page, "empty").await;
    converse(&app, &page).await;
    no_violations(&page, "with messages").await;
    page.screenshot("27-6-axe-messages").await;
    page.close().await;

    let dark = driver.browser_with(DESKTOP, &DARK).await;
    dark.open(&app.url("/")).await;
    dark.wait_for_count(7).await;
    assert_eq!(dark.eval("matchMedia('(prefers-color-scheme: dark)').matches").await, true);
    no_violations(&dark, "dark, with messages").await;
    dark.screenshot("27-6-axe-dark").await;
    dark.close().await;
    app.stop().await;
}
