//! `GET /` and `/static/*`: the page carries the server's settings and its assets are served.

use crate::helpers::{BusKind, spawn_app};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_rabbitmq_mode_exchange_and_limit() {
    let app = spawn_app(BusKind::Rabbit).await;
    let response = app.http.get(app.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(response.headers().contains_key("content-security-policy"));
    let html = response.text().await.unwrap();
    assert!(html.contains(r#"data-mode="rabbitmq""#), "{html}");
    assert!(html.contains(&format!(r#"data-exchange="{}""#, app.exchange())));
    assert!(html.contains(&format!(r#"data-max-bytes="{}""#, app.config.messages.max_bytes)));
    assert!(!html.contains(r#"id="mode-banner""#), "no single-process banner with RabbitMQ");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_says_so_when_it_runs_on_the_embedded_bus() {
    let app = spawn_app(BusKind::Memory).await;
    let html = app.http.get(app.url("/")).send().await.unwrap().text().await.unwrap();
    assert!(html.contains(r#"data-mode="memory""#));
    assert!(html.contains(r#"id="mode-banner""#));
    assert!(html.contains("Single-process mode"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_script_and_styles_are_served_with_cache_headers() {
    let app = spawn_app(BusKind::Memory).await;
    let html = app.http.get(app.url("/")).send().await.unwrap().text().await.unwrap();
    for asset in ["/static/app.js", "/static/style.css", "/static/favicon.svg"] {
        assert!(html.contains(asset), "the page links {asset}");
        let response = app.http.get(app.url(asset)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{asset}");
        assert!(response.headers()["cache-control"].to_str().unwrap().contains("max-age"), "{asset}");
        assert!(!response.text().await.unwrap().is_empty());
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_its_assets_are_compressed_for_browsers_that_accept_it() {
    let app = spawn_app(BusKind::Memory).await;
    for path in ["/", "/static/app.js", "/static/style.css"] {
        let response = app.http.get(app.url(path)).header("accept-encoding", "gzip").send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(
            response.headers().get("content-encoding").map(|v| v.to_str().unwrap()),
            Some("gzip"),
            "{path}"
        );
    }
    app.stop().await;
}
