//! Writing a message: Enter on a touch keyboard, the name checked as it is typed, the fields'
//! edges, focus on load, and how long the browser keeps the page's script and styles.

use fantoccini::key::Key;
use serde_json::json;

use crate::{
    driver::{Driver, Page},
    helpers::{BusKind, spawn_app},
    scenarios::{DARK, DESKTOP, PHONE, open},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_touch_keyboard_enter_makes_a_new_line_and_the_button_sends() {
    let app = spawn_app(BusKind::Rabbit).await;
    let driver = Driver::start().await;
    let page = open(&driver, &app, PHONE).await;
    assert_eq!(
        page.eval("matchMedia('(hover: none) and (pointer: coarse)').matches").await,
        true,
        "a touch screen"
    );
    assert_eq!(page.eval("document.getElementById('text').enterKeyHint").await, "enter");
    page.type_into("text", "first line").await;
    page.press_enter_in_message_box().await;
    page.type_into("text", "second line").await;
    assert_eq!(page.eval("document.getElementById('text').value").await, "first line\nsecond line");
    assert!(page.texts().await.is_empty(), "Enter sent nothing");
    page.screenshot("27-8-touch-enter").await;
    page.click("#send").await;
    let (shown, _) = page.wait_for_message("first line\nsecond line").await;
    assert!(shown.own);
    page.close().await;

    // With a keyboard, Enter still sends.
    let desktop = open(&driver, &app, DESKTOP).await;
    assert_eq!(desktop.eval("document.getElementById('text').enterKeyHint").await, "send");
    desktop.type_into("text", "from a keyboard").await;
    desktop.press_enter_in_message_box().await;
    desktop.wait_for_message("from a keyboard").await;
    desktop.close().await;
    app.stop().await;
}

async fn name_state(page: &Page) -> (serde_json::Value, String, bool) {
    let invalid = page.eval("document.getElementById('name').getAttribute('aria-invalid')").await;
    let error =
        page.eval("document.getElementById('name-error').textContent").await.as_str().unwrap().to_owned();
    let disabled = page.eval("document.getElementById('send').disabled").await == true;
    (invalid, error, disabled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_name_is_checked_as_it_is_typed_and_counted_in_characters() {
    let app = spawn_app(BusKind::Rabbit).await;
    let driver = Driver::start().await;
    let page = open(&driver, &app, PHONE).await;
    page.type_into("text", "hello").await;

    // 70 letters: over the server's 64 bytes, said at the field as the name is typed.
    page.type_into("name", &"a".repeat(70)).await;
    let (invalid, error, disabled) = name_state(&page).await;
    assert_eq!(invalid, "true");
    assert!(error.contains("70 characters") && error.contains("64 fit"), "{error}");
    assert!(disabled, "Send waits for a name that fits");
    assert_eq!(
        page.eval("document.getElementById('name').getAttribute('aria-describedby')").await,
        "name-error",
        "the error is the field's description"
    );
    page.screenshot("27-9-name-too-long").await;

    // 17 emoji are 17 characters for a person, 68 bytes for the rule: 16 fit.
    page.client
        .execute(
            "const n = document.getElementById('name'); n.value = arguments[0];
             n.dispatchEvent(new Event('input', { bubbles: true }));",
            vec![json!("😀".repeat(17))],
        )
        .await
        .unwrap();
    let (_, error, _) = name_state(&page).await;
    assert!(error.contains("17 characters") && error.contains("16 fit"), "{error}");
    page.eval("(document.getElementById('composer').requestSubmit(), true)").await;
    assert_eq!(page.eval("document.activeElement.id").await, "name", "sending points at the name");
    assert!(page.texts().await.is_empty(), "nothing was sent");

    // Fixed: the error goes, and sending works.
    page.client
        .execute(
            "const n = document.getElementById('name'); n.value = 'Ada';
             n.dispatchEvent(new Event('input', { bubbles: true }));",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(name_state(&page).await, (serde_json::Value::Null, String::new(), false));
    page.click("#send").await;
    let (shown, _) = page.wait_for_message("hello").await;
    assert_eq!(shown.user, "Ada");

    // A control character is refused at the field too, as the server would.
    page.client
        .execute(
            "const n = document.getElementById('name'); n.value = 'Ada\\u0007';
             n.dispatchEvent(new Event('input', { bubbles: true }));",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(name_state(&page).await.0, "true");
    page.close().await;
    app.stop().await;
}

async fn check_field_edges(page: &Page, scheme: &str) {
    for field in ["name", "text"] {
        let border =
            page.eval(&format!("getComputedStyle(document.getElementById('{field}')).borderTopColor")).await;
        let border = border.as_str().unwrap();
        for background in ["var(--bg)", "var(--surface)"] {
            let ratio = page.contrast(border, background).await;
            assert!(ratio >= 3.0, "{scheme}: #{field}'s edge on {background} is {ratio:.2}:1, under 3:1");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_have_visible_edges_the_box_has_focus_and_assets_are_kept_a_year() {
    let app = spawn_app(BusKind::Rabbit).await;
    let driver = Driver::start().await;
    let page = open(&driver, &app, DESKTOP).await;
    assert_eq!(page.eval("document.activeElement.id").await, "text", "ready to type on load");
    // Typed at once, without a click.
    page.client.active_element().await.unwrap().send_keys("straight away").await.unwrap();
    page.client.active_element().await.unwrap().send_keys(&Key::Enter.to_string()).await.unwrap();
    page.wait_for_message("straight away").await;
    page.eval("(document.activeElement.blur(), true)").await;
    check_field_edges(&page, "light").await;
    page.close().await;
    let dark = driver.browser_with(DESKTOP, &DARK).await;
    dark.open(&app.url("/")).await;
    dark.eval("(document.activeElement.blur(), true)").await;
    check_field_edges(&dark, "dark").await;

    // The script and styles the page links (versioned URLs) are kept for a year, immutable.
    let assets = dark
        .eval("[...document.querySelectorAll('script[src], link[href]')].map(e => e.src || e.href)")
        .await;
    let assets: Vec<String> = serde_json::from_value(assets).unwrap();
    assert_eq!(assets.len(), 3, "{assets:?}");
    for asset in &assets {
        assert!(asset.contains("?v="), "{asset}");
        let response = app.http.get(asset).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["cache-control"], "public, max-age=31536000, immutable", "{asset}");
        // Another version of the same file (a page from another replica) is not kept.
        let other = asset.replace("?v=", "?v=0");
        let response = app.http.get(&other).send().await.unwrap();
        assert_eq!(response.headers()["cache-control"], "no-cache", "{other}");
    }
    dark.screenshot("27-10-dark-fields").await;
    dark.close().await;
    app.stop().await;
}
