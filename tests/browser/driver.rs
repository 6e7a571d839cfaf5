//! Starting chromedriver and Chromium, and the page-level helpers the scenarios share.

use std::os::unix::process::CommandExt;
use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fantoccini::{Client, ClientBuilder, Locator, key::Key};
use serde_json::{Value, json};

use crate::helpers::within;

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A chromedriver of this test's own, on a free loopback port; killed (by its handle) on drop.
pub struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    pub async fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(CHROMEDRIVER)
            .args([format!("--port={port}"), "--allowed-ips=127.0.0.1".into()])
            // A group of its own, so that dropping the driver ends its browsers too.
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{CHROMEDRIVER}: {e} (scripts/test installs Debian's chromium and chromium-driver)")
            });
        let driver = Self { child, port };
        let http = reqwest::Client::new();
        within("chromedriver to answer", async {
            loop {
                if let Ok(r) = http.get(format!("http://127.0.0.1:{port}/status")).send().await
                    && r.status() == 200
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        driver
    }

    /// A new Chromium with a fresh profile: a separate browser, as another person would have.
    pub async fn browser(&self, width: u32, height: u32) -> Page {
        self.browser_with((width, height), &[]).await
    }

    /// As [`Driver::browser`], with extra Chromium flags.
    pub async fn browser_with(&self, (width, height): (u32, u32), extra: &[&str]) -> Page {
        let profile = std::env::temp_dir().join(format!("fanout-chat-profile-{}", ulid::Ulid::new()));
        let mut args: Vec<String> = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-quic",
        ]
        .iter()
        .chain(extra)
        .map(|a| a.to_string())
        .collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        args.push(format!("--window-size={width},{height}"));
        let mut options = json!({ "binary": CHROMIUM, "args": args });
        // Chromium will not make a window narrower than 500 px; a phone is emulated instead,
        // with its viewport, pixel ratio and touch.
        if width < 500 {
            options["mobileEmulation"] = json!({ "deviceMetrics": { "width": width, "height": height, "pixelRatio": 3.0, "touch": true } });
        }
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("goog:chromeOptions".into(), options);
        let client = within(
            "Chromium to start",
            ClientBuilder::rustls()
                .unwrap()
                .capabilities(capabilities)
                .connect(&format!("http://127.0.0.1:{}", self.port)),
        )
        .await
        .expect("a WebDriver session with Chromium");
        Page { client, profile }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The whole process group: chromedriver and the Chromiums it started. Killing
        // chromedriver alone (a test that failed before closing its browsers) left each Chromium
        // running, parented to init: 78 of them once, after a day of test runs.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One browser showing the chat page.
pub struct Page {
    pub client: Client,
    profile: PathBuf,
}

impl Page {
    pub async fn open(&self, url: &str) {
        within("the page to load", self.client.goto(url)).await.unwrap();
        self.wait_for_state("connected").await;
    }

    /// Evaluates a JavaScript expression in the page.
    pub async fn eval(&self, expression: &str) -> Value {
        within("a script in the page", self.client.execute(&format!("return ({expression});"), vec![]))
            .await
            .unwrap_or_else(|e| panic!("evaluating {expression}: {e}"))
    }

    /// Waits until `expression` is truthy in the page; returns how long it took.
    pub async fn wait_until(&self, what: &str, expression: &str) -> Duration {
        let started = Instant::now();
        within(what, async {
            loop {
                let value = self.eval(expression).await;
                if !(value.is_null() || value == false || value == 0 || value == "") {
                    return started.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }

    /// Waits for the connection status (`data-state` of `#status`).
    pub async fn wait_for_state(&self, state: &str) {
        self.wait_until(
            &format!("the status to become {state}"),
            &format!("document.getElementById('status').dataset.state === {}", json!(state)),
        )
        .await;
    }

    /// The messages shown, oldest first: id, user, time, text, and whether they are "own".
    pub async fn messages(&self) -> Vec<Shown> {
        let value = self
            .eval(
                "[...document.querySelectorAll('#messages .msg')].map(m => ({
                    id: m.dataset.id,
                    user: m.querySelector('.msg-user').textContent,
                    time: m.querySelector('.msg-time').textContent,
                    text: m.querySelector('.msg-text').textContent,
                    own: m.classList.contains('own'),
                    badge: m.querySelector('.msg-badge')?.textContent ?? null,
                }))",
            )
            .await;
        serde_json::from_value(value).unwrap()
    }

    /// The texts of the messages shown, oldest first.
    pub async fn texts(&self) -> Vec<String> {
        self.messages().await.into_iter().map(|m| m.text).collect()
    }

    /// The notices shown in the message list (gaps, skipped messages), oldest first.
    pub async fn notices(&self) -> Vec<String> {
        let value =
            self.eval("[...document.querySelectorAll('#messages .notice')].map(n => n.textContent)").await;
        serde_json::from_value(value).unwrap()
    }

    /// Waits until exactly `count` messages show.
    pub async fn wait_for_count(&self, count: usize) {
        self.wait_until(
            &format!("{count} messages to show"),
            &format!("document.querySelectorAll('#messages .msg').length === {count}"),
        )
        .await;
    }

    /// Whether the message list is scrolled to its end.
    pub async fn at_bottom(&self) -> bool {
        self.eval(
            "(() => { const m = document.getElementById('messages');
                return m.scrollHeight - m.scrollTop - m.clientHeight < 2; })()",
        )
        .await
            == true
    }

    /// Scrolls the message list as a reader does, and waits until the page has seen the
    /// scroll event.
    pub async fn scroll_list_to(&self, top: i64) {
        self.client
            .execute_async(
                "const [top, done] = arguments;
                 const list = document.getElementById('messages');
                 if (list.scrollTop === top) return done();
                 list.addEventListener('scroll', () => setTimeout(done, 0), { once: true });
                 list.scrollTop = top;",
                vec![json!(top)],
            )
            .await
            .unwrap();
    }

    /// Where the text of the message with exactly `text` is, in pixels from the top of the
    /// viewport. The text, not the bubble: a message that joins the group of the one loaded
    /// above it loses its header (name and time), and what the reader reads stays put.
    pub async fn top_of_message(&self, text: &str) -> f64 {
        self.eval(&format!(
            "[...document.querySelectorAll('#messages .msg-text')]
                .find(t => t.textContent === {})
                .getBoundingClientRect().top",
            json!(text)
        ))
        .await
        .as_f64()
        .unwrap()
    }

    /// Waits until a message with exactly `text` shows, and returns it with the wait.
    pub async fn wait_for_message(&self, text: &str) -> (Shown, Duration) {
        let took = self
            .wait_until(
                &format!("the message {text:?} to show"),
                &format!(
                    "[...document.querySelectorAll('#messages .msg .msg-text')].some(t => t.textContent === {})",
                    json!(text)
                ),
            )
            .await;
        let shown = self.messages().await.into_iter().find(|m| m.text == text).unwrap();
        (shown, took)
    }

    /// Types into the field with this id, as keystrokes (BMP characters only: chromedriver's
    /// limit).
    pub async fn type_into(&self, id: &str, text: &str) {
        let field = self.client.find(Locator::Id(id)).await.unwrap();
        field.send_keys(text).await.unwrap();
    }

    /// Puts text into the message box as a paste would (any Unicode), firing `input`.
    pub async fn paste_message(&self, text: &str) {
        self.client
            .execute(
                "const t = document.getElementById('text'); t.value = arguments[0];
                 t.dispatchEvent(new Event('input', { bubbles: true }));",
                vec![json!(text)],
            )
            .await
            .unwrap();
    }

    pub async fn press_enter_in_message_box(&self) {
        self.type_into("text", &Key::Enter.to_string()).await;
    }

    /// Runs axe-core (`tests/browser/axe`, installed by `npm ci` there) on the page as it is
    /// now, and returns its violations, one line each: the rule, its impact, and where.
    /// Injected over WebDriver, so the page's CSP (no inline or foreign script) stays as it is.
    pub async fn axe_violations(&self) -> Vec<String> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/axe/node_modules/axe-core/axe.min.js");
        let source = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("{path}: {e} (run `npm ci` in tests/browser/axe; scripts/test does)"));
        // A message fading in would be measured half transparent: wait for the arrivals.
        self.wait_until(
            "arrival animations to end",
            "document.getAnimations().every(a => a.effect.getTiming().iterations === Infinity)",
        )
        .await;
        if self.eval("typeof window.axe === 'undefined'").await == true {
            within("axe-core to load in the page", self.client.execute(&source, vec![])).await.unwrap();
        }
        let result = within(
            "axe-core to check the page",
            self.client.execute_async(
                "const done = arguments[arguments.length - 1];
                 axe.run(document, { resultTypes: ['violations'] })
                    .then(r => done(r.violations.map(v => `${v.id} (${v.impact}): ${v.help}: ` +
                        v.nodes.map(n => `${n.target.join(' ')} [${n.failureSummary}]`).join('; '))))
                    .catch(e => done([`axe failed: ${e}`]));",
                vec![],
            ),
        )
        .await
        .unwrap();
        serde_json::from_value(result).unwrap()
    }

    /// The WCAG contrast ratio of two CSS colours (`var(--surface)` works) as the page
    /// resolves them in its colour scheme.
    pub async fn contrast(&self, a: &str, b: &str) -> f64 {
        let ratio = self
            .client
            .execute(
                "const rgb = (colour) => {
                     const probe = document.createElement('span');
                     probe.style.color = colour;
                     document.body.append(probe);
                     const value = getComputedStyle(probe).color;
                     probe.remove();
                     return value.match(/[0-9.]+/g).slice(0, 3).map(Number);
                 };
                 const luminance = (colour) => {
                     const [r, g, b] = rgb(colour).map(v => v / 255)
                         .map(c => c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4);
                     return 0.2126 * r + 0.7152 * g + 0.0722 * b;
                 };
                 const [x, y] = [luminance(arguments[0]), luminance(arguments[1])];
                 return (Math.max(x, y) + 0.05) / (Math.min(x, y) + 0.05);",
                vec![json!(a), json!(b)],
            )
            .await
            .unwrap();
        ratio.as_f64().unwrap()
    }

    /// Whether the element matching `selector` is entirely inside the viewport.
    pub async fn in_view(&self, selector: &str) -> bool {
        self.eval(&format!(
            "(() => {{ const r = document.querySelector({}).getBoundingClientRect();
                return r.width > 0 && r.height > 0 && r.left >= 0 && r.top >= 0
                    && r.right <= window.innerWidth && r.bottom <= window.innerHeight; }})()",
            json!(selector)
        ))
        .await
            == true
    }

    /// Clicks the element matching `selector`, as a person does.
    pub async fn click(&self, selector: &str) {
        let element = within("an element to click", self.client.find(Locator::Css(selector)))
            .await
            .unwrap_or_else(|e| panic!("{selector}: {e}"));
        within("a click", element.click()).await.unwrap_or_else(|e| panic!("clicking {selector}: {e}"));
    }

    /// Saves a screenshot as `target/browser-screenshots/<name>.png`.
    pub async fn screenshot(&self, name: &str) {
        let png = within("a screenshot", self.client.screenshot()).await.unwrap();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../browser-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    pub async fn close(self) {
        let _ = within("the browser to close", self.client.close()).await;
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

#[derive(Debug, serde::Deserialize, PartialEq)]
pub struct Shown {
    pub id: String,
    pub user: String,
    pub time: String,
    pub text: String,
    pub own: bool,
    /// The service badge's text (its key's name, after a hidden "service "), if it has one.
    pub badge: Option<String>,
}
