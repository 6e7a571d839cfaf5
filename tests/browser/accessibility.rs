//! The page for screen readers: what is announced, what each message is called, landmarks.

use serde_json::json;

use crate::{
    driver::Driver,
    helpers::{BusKind, spawn_app},
    scenarios::{DESKTOP, open, wait_for_history},
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
            window.fetch = (...a) => new Promise(r => setTimeout(() => r(real(...a)), 500)); return true; })()",
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
