//! Small and short screens: the single-process banner can go, and a short screen scrolls the
//! whole page so the composer is always reachable (WCAG 1.4.10, reflow at 400 % zoom).

use crate::{
    driver::{Driver, Page},
    helpers::{BusKind, spawn_app},
    scenarios::PHONE,
};

const LIST_HEIGHT: &str = "document.getElementById('messages').clientHeight";
const BANNER_SHOWN: &str =
    "(() => { const b = document.getElementById('mode-banner'); return !b.hidden && b.offsetHeight > 0; })()";

async fn scroll_page_to_end(page: &Page) {
    page.eval("(window.scrollTo(0, document.scrollingElement.scrollHeight), true)").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_single_process_banner_can_be_dismissed_for_good() {
    let app = spawn_app(BusKind::Memory).await;
    let driver = Driver::start().await;
    let page = driver.browser(PHONE.0, PHONE.1).await;
    page.open(&app.url("/")).await;
    assert_eq!(page.eval(BANNER_SHOWN).await, true);
    let with_banner = page.eval(LIST_HEIGHT).await.as_f64().unwrap();
    let banner = page.eval("document.getElementById('mode-banner').offsetHeight").await.as_f64().unwrap();
    page.screenshot("27-3-banner-phone").await;

    page.click("#mode-banner-dismiss").await;
    assert_eq!(page.eval(BANNER_SHOWN).await, false);
    let without = page.eval(LIST_HEIGHT).await.as_f64().unwrap();
    assert!((without - with_banner - banner).abs() < 2.0, "the log gets the banner's {banner} px");
    page.open(&app.url("/")).await;
    assert_eq!(page.eval(BANNER_SHOWN).await, false, "still dismissed after a reload");
    page.screenshot("27-3-banner-dismissed-phone").await;
    page.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_320_by_256_the_page_scrolls_and_the_composer_is_not_cut_off() {
    let app = spawn_app(BusKind::Memory).await;
    for n in 1..=12 {
        app.post_text(&format!("earlier message {n}")).await;
    }
    let driver = Driver::start().await;
    // 1280×1024 at 400 % zoom, with the banner still there: the worst case.
    let page = driver.browser(320, 256).await;
    page.open(&app.url("/")).await;
    page.wait_for_count(12).await;
    assert_eq!(page.eval("[innerWidth, innerHeight]").await, serde_json::json!([320, 256]));
    assert_eq!(page.eval(BANNER_SHOWN).await, true);
    assert_eq!(
        page.eval("document.scrollingElement.scrollHeight > innerHeight").await,
        true,
        "the page itself scrolls"
    );
    assert_eq!(
        page.eval("document.documentElement.scrollWidth <= innerWidth").await,
        true,
        "only vertically"
    );
    page.eval("(window.scrollTo(0, 0), true)").await;
    page.screenshot("27-3-320x256-top").await;

    scroll_page_to_end(&page).await;
    for control in ["#name", "#text", "#send"] {
        assert!(page.in_view(control).await, "{control} is fully on screen once the page is scrolled");
    }
    let list = page.eval(LIST_HEIGHT).await.as_f64().unwrap();
    assert!(list >= 100.0, "the log keeps room to read: {list} px");
    assert!(page.at_bottom().await, "the newest message is in view");
    assert_eq!(
        page.eval("document.scrollingElement.scrollHeight - document.body.offsetHeight").await,
        0,
        "nothing lengthens the page below the composer"
    );
    page.type_into("text", "sent at 400 %").await;
    page.click("#send").await;
    let (shown, _) = page.wait_for_message("sent at 400 %").await;
    assert!(shown.own);
    scroll_page_to_end(&page).await;
    page.screenshot("27-3-320x256-composer").await;
    page.close().await;

    // A phone in landscape: the header and banner scroll away, and the log gets most of it.
    let landscape = driver.browser(844, 390).await;
    landscape.open(&app.url("/")).await;
    scroll_page_to_end(&landscape).await;
    let height = landscape.eval("innerHeight").await.as_f64().unwrap();
    let list = landscape.eval(LIST_HEIGHT).await.as_f64().unwrap();
    assert!(list >= 0.6 * height, "the log has {list} of {height} px");
    for control in ["#name", "#text", "#send"] {
        assert!(landscape.in_view(control).await, "{control} is on screen in landscape");
    }
    landscape.screenshot("27-3-landscape").await;
    landscape.close().await;
    app.stop().await;
}
