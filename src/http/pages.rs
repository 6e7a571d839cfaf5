//! `GET /`: the chat page, rendered from `templates/index.html`.

use askama::Template;
use axum::{extract::State, response::Html};

use super::error::AppError;
use crate::state::AppState;

#[derive(Template)]
#[template(path = "index.html")]
struct IndexTemplate<'a> {
    title: &'a str,
    mode: &'a str,
    exchange: &'a str,
    max_message_bytes: usize,
    asset_version: &'a str,
}

pub async fn index(State(state): State<AppState>) -> Result<Html<String>, AppError> {
    let config = &state.config;
    let page = IndexTemplate {
        title: "fanout-chat",
        mode: config.mode(),
        exchange: config.rabbitmq.as_ref().map_or("", |r| r.exchange.as_str()),
        max_message_bytes: config.messages.max_bytes,
        asset_version: super::asset_version(),
    };
    Ok(Html(page.render()?))
}
