//! Reading the log: links, senders' groups and colours, day dividers, long messages.

use fantoccini::Locator;
use lapin::BasicProperties;
use serde_json::{Value, json};

use crate::{
    driver::{Driver, Page},
    helpers::{BusKind, Service, TestApp, service, spawn_app, within},
    scenarios::{DARK, DESKTOP, PHONE, open},
};

/// Publishes an envelope as another service does, with its own `ts` (RFC 3339).
pub async fn publish_at(service: &Service, app: &TestApp, user: &str, text: &str, ts: &str) {
    let id = ulid::Ulid::new().to_string();
    let body = json!({ "id": id, "text": text, "user": user, "ts": ts }).to_string();
    service.publish(app.exchange(), body.as_bytes(), BasicProperties::default()).await;
}

/// A time `days` days before today, at `hour`:`minute`, in the browser's time zone, as
/// RFC 3339 (UTC).
pub async fn local_time(page: &Page, days: i64, hour: u32, minute: u32) -> String {
    page.eval(&format!(
        "(() => {{ const d = new Date(); return new Date(d.getFullYear(), d.getMonth(),
            d.getDate() - {days}, {hour}, {minute}).toISOString(); }})()"
    ))
    .await
    .as_str()
    .unwrap()
    .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_becomes_a_link_that_opens_and_a_javascript_url_stays_text() {
    let app = spawn_app(BusKind::Rabbit).await;
    let driver = Driver::start().await;
    let page = open(&driver, &app, DESKTOP).await;

    let status = app.url("/healthz?from=chat&n=1#top");
    let text = format!(
        "Status: {status}. Docs (https://example.test/wiki/Rust_(language)). \
         Not links: javascript:alert(document.domain), <a href=\"javascript:alert(1)\">x</a>, ftp://example.test/"
    );
    app.post_json(json!({ "text": text, "user": "Ada" })).await;
    page.wait_for_message(&text).await;
    let links = page
        .eval(
            "[...document.querySelectorAll('#messages .msg-text a')].map(a => ({
                href: a.getAttribute('href'), text: a.textContent, rel: a.rel, target: a.target }))",
        )
        .await;
    assert_eq!(
        links,
        json!([
            { "href": status, "text": status, "rel": "noopener noreferrer", "target": "_blank" },
            {
                "href": "https://example.test/wiki/Rust_(language)",
                "text": "https://example.test/wiki/Rust_(language)",
                "rel": "noopener noreferrer",
                "target": "_blank",
            },
        ]),
        "two links, without the sentence's full stop and closing bracket"
    );
    assert_eq!(
        page.eval("document.querySelectorAll('#messages [href^=\"javascript\"], #messages .msg-text *:not(a):not(a *)').length")
            .await,
        0,
        "a javascript: URL and markup stay text"
    );
    page.screenshot("27-1-links").await;

    // The link works: it opens the page it names, in a new tab.
    let before = page.client.windows().await.unwrap();
    page.click("#messages .msg-text a").await;
    let opened = within("the link to open a tab", async {
        loop {
            let now = page.client.windows().await.unwrap();
            if let Some(tab) = now.into_iter().find(|w| !before.contains(w)) {
                return tab;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    page.client.switch_to_window(opened).await.unwrap();
    within("the tab to load", async {
        while page.client.current_url().await.unwrap().as_str() != status {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    page.client.close_window().await.unwrap();
    page.client.switch_to_window(before[0].clone()).await.unwrap();
    page.close().await;

    // On a phone a long URL wraps only at / ? & # (or after "://"), never inside a word.
    let phone = open(&driver, &app, PHONE).await;
    let long = "https://example.test/a-rather-long-path/with-several-parts/and-more-of-them\
                ?first=one&second=two&third=three#the-fragment-at-the-end";
    app.post_json(json!({ "text": format!("Read {long} today"), "user": "Ada" })).await;
    phone.wait_for_message(&format!("Read {long} today")).await;
    let breaks = phone
        .eval(&format!(
            "(() => {{
                const a = [...document.querySelectorAll('#messages .msg-text a')]
                    .find(a => a.textContent === {});
                const chars = [];
                const walker = document.createTreeWalker(a, NodeFilter.SHOW_TEXT);
                for (let n = walker.nextNode(); n; n = walker.nextNode()) {{
                    for (let i = 0; i < n.length; i++) {{
                        const r = document.createRange(); r.setStart(n, i); r.setEnd(n, i + 1);
                        chars.push([n.data[i], r.getBoundingClientRect().top]);
                    }}
                }}
                const breaks = [];
                for (let i = 1; i < chars.length; i++) {{
                    if (chars[i][1] > chars[i - 1][1] + 2) breaks.push(chars[i - 2][0] + chars[i - 1][0] + '|' + chars[i][0]);
                }}
                return breaks;
            }})()",
            json!(long)
        ))
        .await;
    let breaks: Vec<String> = serde_json::from_value(breaks).unwrap();
    assert!(breaks.len() >= 2, "the URL wraps on a phone: {breaks:?}");
    for b in &breaks {
        let (before, after) = b.split_once('|').unwrap();
        assert!(
            "/?&#".contains(after) || before == "//",
            "a line breaks only before / ? & # or after ://, not at {b:?} (all: {breaks:?})"
        );
    }
    assert_eq!(phone.eval("document.documentElement.scrollWidth <= window.innerWidth").await, true);
    phone.screenshot("27-1-link-on-a-phone").await;
    phone.close().await;
    app.stop().await;
}

/// What each message shows: its sender, whether its header (name, time) is visible, its
/// accessible name, and its name's colour.
async fn headers(page: &Page) -> Vec<(String, bool, String, String)> {
    let value = page
        .eval(
            "[...document.querySelectorAll('#messages .msg')].map(m => {
                const user = m.querySelector('.msg-user');
                const label = document.getElementById(m.getAttribute('aria-labelledby'));
                return [m.querySelector('.msg-text').textContent,
                        user.getBoundingClientRect().width > 1,
                        label ? label.textContent : '',
                        getComputedStyle(user).color];
            })",
        )
        .await;
    serde_json::from_value(value).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_messages_from_one_sender_show_one_header_in_a_colour_of_their_own() {
    let app = spawn_app(BusKind::Rabbit).await;
    let driver = Driver::start().await;
    let page = open(&driver, &app, DESKTOP).await;
    // Two earlier messages of Ada's, ten minutes apart: too far apart for one group.
    let service = service().await;
    let twenty_ago = page.eval("new Date(Date.now() - 20 * 60000).toISOString()").await;
    let ten_ago = page.eval("new Date(Date.now() - 10 * 60000).toISOString()").await;
    publish_at(&service, &app, "Ada", "twenty minutes ago", twenty_ago.as_str().unwrap()).await;
    publish_at(&service, &app, "Ada", "ten minutes ago", ten_ago.as_str().unwrap()).await;
    for text in ["one", "two", "three"] {
        app.post_json(json!({ "text": text, "user": "Ada" })).await;
    }
    app.post_json(json!({ "text": "Bob's turn", "user": "Bob" })).await;
    app.post_json(json!({ "text": "Ada again", "user": "Ada" })).await;
    // Two anonymous messages may be two people: each keeps its header.
    app.post_json(json!({ "text": "who am I" })).await;
    app.post_json(json!({ "text": "and who are you" })).await;
    page.wait_for_message("and who are you").await;

    let shown = headers(&page).await;
    let visible: Vec<(&str, bool)> = shown.iter().map(|(t, v, _, _)| (t.as_str(), *v)).collect();
    assert_eq!(
        visible,
        [
            ("twenty minutes ago", true),
            ("ten minutes ago", true),
            ("one", true),
            ("two", false),
            ("three", false),
            ("Bob's turn", true),
            ("Ada again", true),
            ("who am I", true),
            ("and who are you", true),
        ],
        "three messages in a row from Ada show one header"
    );
    let names: Vec<&str> = shown.iter().map(|(_, _, n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["Ada", "Ada", "Ada", "Ada", "Ada", "Bob", "Ada", "anonymous", "anonymous"],
        "every message is named by its sender"
    );
    let colour = |who: &str| {
        let colours: Vec<&str> =
            shown.iter().filter(|(_, _, n, _)| n == who).map(|(_, _, _, c)| c.as_str()).collect();
        assert!(colours.windows(2).all(|w| w[0] == w[1]), "{who} has one colour: {colours:?}");
        colours[0].to_owned()
    };
    let ada = colour("Ada");
    colour("Bob");
    page.screenshot("27-2-groups").await;

    // The colour comes from the name: another browser shows Ada in the same one.
    let other = open(&driver, &app, PHONE).await;
    other.wait_for_count(9).await;
    assert_eq!(headers(&other).await[0].3, ada, "the same colour for the same name elsewhere");
    other.close().await;

    // Every name colour reads on every message background, in both schemes.
    check_name_colours(&page, "light").await;
    page.close().await;
    let dark = driver.browser_with(DESKTOP, &DARK).await;
    dark.open(&app.url("/")).await;
    dark.wait_for_count(9).await;
    check_name_colours(&dark, "dark").await;
    dark.screenshot("27-2-groups-dark").await;
    dark.close().await;
    app.stop().await;
}

async fn check_name_colours(page: &Page, scheme: &str) {
    for n in 0..8 {
        for background in ["--surface", "--own-bg", "--bg"] {
            let ratio = page.contrast(&format!("var(--user-{n})"), &format!("var({background})")).await;
            assert!(ratio >= 4.5, "{scheme}: --user-{n} on {background} is {ratio:.2}:1, under 4.5:1");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_from_earlier_days_sit_under_day_dividers() {
    let app = spawn_app(BusKind::Rabbit).await;
    let driver = Driver::start().await;
    let live = open(&driver, &app, DESKTOP).await;
    let three_days_ago = local_time(&live, 3, 9, 30).await;
    let yesterday = local_time(&live, 1, 12, 0).await;
    let service = service().await;
    publish_at(&service, &app, "ops", "three days ago", &three_days_ago).await;
    publish_at(&service, &app, "ops", "yesterday at noon", &yesterday).await;
    app.post_json(json!({ "text": "today", "user": "Ada" })).await;
    live.wait_for_message("today").await;
    crate::scenarios::wait_for_history(&app, "today").await;
    let expected_date = live
        .eval(&format!(
            "new Intl.DateTimeFormat(undefined, {{ dateStyle: 'full' }}).format(new Date({}))",
            json!(three_days_ago)
        ))
        .await;
    let dividers = "[...document.querySelectorAll('#messages .day, #messages .msg')].map(e =>
        e.classList.contains('day')
            ? ['day', e.textContent, e.querySelector('time').getAttribute('datetime')]
            : ['msg', e.querySelector('.msg-text').textContent, e.querySelector('time').getAttribute('datetime')])";
    let history = open(&driver, &app, PHONE).await;
    for (page, name) in [(&live, "live"), (&history, "history")] {
        page.wait_for_count(3).await;
        let shown = page.eval(dividers).await;
        let shown = shown.as_array().unwrap();
        assert_eq!(shown.len(), 6, "{name}: three days, three messages: {shown:?}");
        assert_eq!(shown[0][0], "day");
        assert_eq!(shown[0][1], expected_date, "{name}: an older day is named by its date");
        assert_eq!(shown[1][1], "three days ago");
        assert_eq!(shown[1][2], json!(three_days_ago), "{name}: the full time in <time datetime>");
        assert_eq!(shown[2].as_array().unwrap()[..2], [json!("day"), json!("Yesterday")], "{name}");
        assert_eq!(shown[3][1], "yesterday at noon");
        assert_eq!(shown[4].as_array().unwrap()[..2], [json!("day"), json!("Today")], "{name}");
        assert_eq!(shown[5][1], "today");
        // The dividers' datetime is each message's local date.
        let local_dates = page
            .eval(
                "[...document.querySelectorAll('#messages .msg time')].map(t => {
                    const d = new Date(t.dateTime);
                    return `${d.getFullYear()}-${String(d.getMonth() + 1).padStart(2, '0')}-${String(d.getDate()).padStart(2, '0')}`;
                })",
            )
            .await;
        let divider_dates: Vec<Value> =
            shown.iter().filter(|e| e[0] == "day").map(|e| e[2].clone()).collect();
        assert_eq!(json!(divider_dates), local_dates, "{name}");
        page.screenshot(&format!("27-4-day-dividers-{name}")).await;
    }
    history.close().await;
    live.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4_kb_message_is_collapsed_to_about_twelve_lines_and_expands() {
    let app = spawn_app(BusKind::Rabbit).await;
    let driver = Driver::start().await;
    let page = open(&driver, &app, PHONE).await;
    let limit = app.config.messages.max_bytes;
    let mut long = String::new();
    let mut n = 1;
    while long.len() < limit {
        long.push_str(&format!("Line {n}: the quick brown fox jumps over the lazy dog.\n"));
        n += 1;
    }
    long.truncate(limit);
    let long = long.trim_end().to_owned();
    app.post_json(json!({ "text": long, "user": "Ada" })).await;
    app.post_json(json!({ "text": "a short one", "user": "Bob" })).await;
    page.wait_for_message("a short one").await;

    let geometry = "(() => { const m = [...document.querySelectorAll('#messages .msg')][0];
        const t = m.querySelector('.msg-text'); const b = m.querySelector('.show-more');
        return { shown: t.clientHeight, full: t.scrollHeight,
                 line: parseFloat(getComputedStyle(t).lineHeight),
                 button: b && b.textContent, expanded: b && b.getAttribute('aria-expanded') }; })()";
    let collapsed = page.eval(geometry).await;
    let line = collapsed["line"].as_f64().unwrap();
    let shown = collapsed["shown"].as_f64().unwrap();
    assert!(
        (11.0 * line..=12.5 * line).contains(&shown),
        "about 12 lines show ({shown} px, lines of {line} px)"
    );
    assert!(collapsed["full"].as_f64().unwrap() > 3.0 * shown, "the rest is hidden: {collapsed}");
    assert_eq!((&collapsed["button"], &collapsed["expanded"]), (&json!("Show more"), &json!("false")));
    assert_eq!(
        page.eval("document.querySelectorAll('#messages .show-more').length").await,
        1,
        "not on a short one"
    );
    assert_eq!(page.messages().await[0].text, long, "the whole text is in the page (and read out)");
    page.screenshot("27-7-long-collapsed").await;

    page.client.find(Locator::Css(".show-more")).await.unwrap().click().await.unwrap();
    let expanded = page.eval(geometry).await;
    assert!(expanded["shown"].as_f64().unwrap() >= expanded["full"].as_f64().unwrap() - 1.0, "{expanded}");
    assert_eq!((&expanded["button"], &expanded["expanded"]), (&json!("Show less"), &json!("true")));
    page.scroll_list_to(0).await;
    page.screenshot("27-7-long-expanded").await;
    page.click(".show-more").await;
    assert_eq!(page.eval(geometry).await["shown"], collapsed["shown"], "and collapses again");
    page.close().await;
    app.stop().await;
}
