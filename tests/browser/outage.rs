//! When the server goes away: the outage bar, "Retry now", what is sent meanwhile, and what
//! the page says after a single-process restart.

use serde_json::json;

use crate::{
    chaos::ChaosProxy,
    driver::Driver,
    helpers::{BusKind, spawn_app, spawn_app_with},
    scenarios::{DESKTOP, open, open_through},
};

const OUTAGE_SHOWN: &str = "!document.getElementById('outage').hidden";
/// Milliseconds until the page's next attempt to reconnect (NaN while none is scheduled).
const RETRY_IN: &str = "Number(document.getElementById('outage').dataset.retryAt) - Date.now()";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_kill_shows_the_outage_bar_and_retry_now_reconnects_at_once() {
    let app = spawn_app(BusKind::Rabbit).await;
    let mut config = app.config.clone();
    config.port = app.addr.port();
    // The page reaches the server through a proxy of the test's own, which can hold it off while
    // the server restarts: then the reconnection can only come from "Retry now".
    let proxy = ChaosProxy::start(app.addr).await;
    let driver = Driver::start().await;
    let page = open_through(&driver, &proxy, DESKTOP, &[]).await;
    assert_eq!(page.eval(OUTAGE_SHOWN).await, false, "no bar while connected");
    // Every change of the status's announced label from here on.
    page.eval(
        "(() => { window.labels = []; const label = document.querySelector('#status .status-label');
            new MutationObserver(() => window.labels.push(label.textContent))
                .observe(label, { childList: true, characterData: true, subtree: true });
            return true; })()",
    )
    .await;

    // A send that could not reach the server leaves an error under the box, and the text in it...
    page.eval("(window.realFetch = window.fetch, window.fetch = () => Promise.reject(new TypeError('Failed to fetch')), true)")
        .await;
    page.type_into("text", "this one failed first").await;
    page.press_enter_in_message_box().await;
    let error = "document.getElementById('composer-error').textContent";
    page.wait_until(
        "the page to say the server could not be reached",
        &format!("{error}.includes('Could not reach')"),
    )
    .await;
    page.eval("(window.fetch = window.realFetch, true)").await;

    // ...and the server is killed.
    app.stop_keeping_broker_state().await;
    page.wait_until("the outage bar", OUTAGE_SHOWN).await;
    page.wait_for_state("reconnecting").await;
    assert_eq!(page.eval("document.getElementById('retry').hidden").await, false, "Retry now is offered");
    let bar = page.eval("document.getElementById('outage').textContent").await;
    assert!(bar.as_str().unwrap().contains("Connection lost"), "the bar says what happened: {bar}");
    assert_eq!(page.eval("document.getElementById('send').disabled").await, false, "Send stays usable");
    page.screenshot("27-5-outage-bar").await;

    // The server comes back, while the proxy still holds the page off.
    proxy.cut().await;
    let app = spawn_app_with(config).await;
    // With the tab visible, no wait between attempts is longer than 5 s.
    page.wait_until(
        "the next attempt to be at least 2 s away",
        &format!(
            "(() => {{ const ms = {RETRY_IN}; window.longest = Math.max(window.longest || 0, ms || 0); return ms > 2000; }})()"
        ),
    )
    .await;
    let longest = page.eval("window.longest").await.as_f64().unwrap();
    assert!(longest <= 5000.0, "the backoff is capped at 5 s while the tab is visible: {longest} ms");
    proxy.restore().await;
    let due = page.eval("Number(document.getElementById('outage').dataset.retryAt)").await.as_f64().unwrap();
    page.click("#retry").await;
    page.wait_for_state("connected").await;
    let now = page.eval("Date.now()").await.as_f64().unwrap();
    assert!(now < due, "Retry now connected at once, {:.0} ms before the scheduled attempt", due - now);

    // Once connected: the bar goes, focus returns to the box, and the old error is cleared
    // (the text is still there to send).
    assert_eq!(page.eval(OUTAGE_SHOWN).await, false);
    assert_eq!(page.eval("document.activeElement.id").await, "text");
    assert_eq!(page.eval(error).await, "", "no stale error once connected");
    assert_eq!(page.eval("document.getElementById('text').value").await, "this one failed first");
    page.press_enter_in_message_box().await;
    page.wait_for_message("this one failed first").await;

    // The network drops: what is sent meanwhile waits, visibly, and goes out once it is back.
    proxy.cut().await;
    page.wait_until("the outage bar", OUTAGE_SHOWN).await;
    page.type_into("text", "sent while the network was down").await;
    page.press_enter_in_message_box().await;
    page.wait_until(
        "the message to wait in the outbox",
        "document.querySelectorAll('#outbox .pending').length === 1",
    )
    .await;
    let pending = page.eval("document.querySelector('#outbox .pending').textContent").await;
    assert!(pending.as_str().unwrap().contains("sent while the network was down"), "{pending}");
    assert!(pending.as_str().unwrap().contains("Waiting for the connection"), "{pending}");
    assert_eq!(
        page.eval("document.getElementById('text').value").await,
        "",
        "the box is free for the next one"
    );
    assert_eq!(page.texts().await, ["this one failed first"], "not shown as sent");
    page.screenshot("27-5-outage-waiting").await;
    let violations = page.axe_violations().await;
    assert!(violations.is_empty(), "axe, during an outage: {violations:#?}");
    proxy.restore().await;
    // The page may already be reconnecting by itself: a click from script, which does nothing
    // then, rather than a pointer click on a bar that may be going.
    page.eval("(document.getElementById('retry').click(), true)").await;
    page.wait_for_state("connected").await;
    let (sent, _) = page.wait_for_message("sent while the network was down").await;
    assert!(sent.own);
    page.wait_until("the outbox to empty", "document.querySelectorAll('#outbox .pending').length === 0")
        .await;
    app.post_text("live again").await;
    page.wait_for_message("live again").await;
    assert_eq!(
        page.texts().await,
        ["this one failed first", "sent while the network was down", "live again"]
    );
    assert_eq!(
        page.eval("window.labels").await,
        json!(["Reconnecting", "Connected", "Reconnecting", "Connected"]),
        "the status announced each outage once and each end once"
    );
    assert_eq!(
        page.eval("document.getElementById('status').hasAttribute('title')").await,
        false,
        "no tooltip of session ids in the status's accessible name"
    );
    page.screenshot("27-5-reconnected").await;
    page.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_single_process_restart_the_page_says_history_began_again() {
    let app = spawn_app(BusKind::Memory).await;
    let mut config = app.config.clone();
    config.port = app.addr.port();
    let driver = Driver::start().await;
    let page = open(&driver, &app, DESKTOP).await;
    app.post_text("before the restart").await;
    page.wait_for_message("before the restart").await;

    app.stop_keeping_broker_state().await;
    page.wait_for_state("reconnecting").await;
    let app = spawn_app_with(config).await;
    app.post_text("after the restart").await;
    page.wait_for_message("after the restart").await;
    page.wait_until(
        "the notice to say the history began again",
        "[...document.querySelectorAll('#messages .notice')].some(n => n.textContent.includes('history began again'))",
    )
    .await;
    let notices = page.notices().await;
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(!notices[0].contains("no longer available"), "{notices:?}");
    assert_eq!(page.texts().await, ["before the restart", "after the restart"]);
    page.screenshot("27-10-single-process-restart").await;
    page.close().await;
    app.stop().await;
}
