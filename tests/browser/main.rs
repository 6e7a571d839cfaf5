//! The chat page in a real browser: Debian's Chromium, headless, driven over WebDriver by
//! fantoccini through Debian's chromedriver, against the real app on the real RabbitMQ.
//!
//! Each test saves screenshots under `target/browser-screenshots/` for a person to look at.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails loudly where its setup is broken")]

#[path = "../api/helpers.rs"]
#[allow(dead_code, reason = "the browser tests use only part of the API tests' helpers")]
mod helpers;

#[path = "../api/chaos.rs"]
#[allow(dead_code, reason = "the browser tests use only part of the proxy")]
mod chaos;

mod accessibility;
mod composing;
mod driver;
mod outage;
mod reading;
mod scenarios;
mod screens;
