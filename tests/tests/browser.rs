//! A real browser through an authenticated tunnel: headless Chromium opens the tunnel's URL
//! once with `?burrow_token=<token>`, lands on the page without the token in its address, and
//! from then on its cookie carries it: a followed link, a `fetch`, a WebSocket from the page.
//! A browser without the cookie gets the edge's 401 page, and the app in the devbox sees
//! neither the token nor the cookie, ever.
//!
//! Needs Chromium (`.ci/run` installs Debian's `chromium`); its absence fails the test.

use burrow_tests::chromium::{Chromium, Redirect};
use burrow_tests::site::{FIRST, SECOND, Site};
use burrow_tests::{TestAgent, TestEdge};
use serde_json::json;

/// A script that opens a WebSocket to the page's own host, sends a message and resolves with
/// the first message back (or rejects, saying how the socket ended).
const WEBSOCKET_ECHO: &str = "new Promise((resolve, reject) => {
    const ws = new WebSocket('ws://' + location.host + '/ws');
    ws.onopen = () => ws.send('hello through burrow');
    ws.onmessage = (e) => { resolve(e.data); ws.close(); };
    ws.onclose = (e) => reject(new Error('closed before an echo, code ' + e.code));
})";

/// A script that resolves with how a WebSocket to the page's own host ended: `open` if the
/// handshake succeeded, `closed {code}` otherwise.
const WEBSOCKET_OUTCOME: &str = "new Promise((resolve) => {
    const ws = new WebSocket('ws://' + location.host + '/ws');
    ws.onopen = () => { resolve('open'); ws.close(); };
    ws.onclose = (e) => resolve('closed ' + e.code);
})";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_opens_an_authenticated_tunnel_once_with_its_token_then_holds_a_cookie() {
    let edge = TestEdge::start().await;
    let devbox = edge.devbox(Some("authenticated")).await;
    let token = devbox.auth_token.clone().expect("auth token at creation");
    let key = devbox.key.clone().expect("tunnel key");
    let _agent = TestAgent::start(&edge, &devbox).await;
    let site = Site::start().await;
    let port = site.addr.port();
    let home = edge.url(port, &key, "/");
    let second = edge.url(port, &key, "/second");
    let with_token = format!("{home}?burrow_token={token}");
    let browser = Chromium::start().await;

    // The first visit: the edge takes the token and sends the browser to the same URL without it.
    let mut page = browser.page(None).await;
    let load = page.navigate(&with_token).await;
    assert_eq!(
        load.redirects,
        [Redirect {
            status: 303,
            from: with_token.clone(),
            to: home.clone(),
        }],
        "{load:?}"
    );
    assert_eq!((load.status, load.url.as_str()), (200, home.as_str()));
    assert_eq!(
        page.eval_str("location.href").await,
        home,
        "the token left the address"
    );
    assert_eq!(page.eval_str("document.title").await, FIRST);
    assert_eq!(
        page.eval_str("document.getElementById('title').textContent")
            .await,
        FIRST
    );

    // The browser holds the cookie, for this host only, out of the page's reach.
    let cookies = page.cookies(&home).await;
    let cookie = cookies
        .iter()
        .find(|c| c["name"] == "burrow_auth")
        .unwrap_or_else(|| panic!("no burrow_auth cookie after the first visit: {cookies:?}"));
    let host = home
        .trim_start_matches("http://")
        .split(':')
        .next()
        .expect("host");
    assert_eq!(cookie["domain"], host, "a host-only cookie: {cookie}");
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Lax", "{cookie}");
    assert_eq!(cookie["secure"], false, "plain HTTP: {cookie}");
    let value = cookie["value"].as_str().expect("cookie value").to_owned();
    assert!(!value.is_empty() && !value.contains(&token), "{cookie}");
    let visible = page.eval_str("document.cookie").await;
    assert!(!visible.contains("burrow_auth"), "HttpOnly: {visible:?}");

    // A link: a page load on the cookie alone.
    let load = page
        .navigating("document.getElementById('next').click()")
        .await;
    assert_eq!((load.status, load.url.as_str()), (200, second.as_str()));
    assert!(load.redirects.is_empty(), "{load:?}");
    assert_eq!(page.eval_str("location.href").await, second);
    assert_eq!(page.eval_str("document.title").await, SECOND);

    // A fetch from the page.
    let api = page.eval("fetch('/api').then((r) => r.json())").await;
    assert_eq!(api, json!({ "page": "api" }));

    // A WebSocket from the page: the handshake carries the cookie, then the echo flows.
    assert_eq!(page.eval(WEBSOCKET_ECHO).await, "hello through burrow");

    // The app saw each of those once, and neither the token nor the cookie in any of them.
    let seen = site.requests();
    let targets: Vec<&str> = seen.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(targets, ["/", "/second", "/api", "/ws"], "{seen:#?}");
    let handshake = &seen[3];
    assert!(
        handshake
            .headers
            .iter()
            .any(|(n, v)| n == "upgrade" && v.eq_ignore_ascii_case("websocket")),
        "{handshake:?}"
    );
    for request in &seen {
        for (name, v) in &request.headers {
            assert!(
                !v.contains(&token) && !v.contains(&value) && !v.contains("burrow_auth"),
                "{} {} reached the app with `{name}: {v}`",
                request.method,
                request.target
            );
            assert_ne!(name, "authorization", "{request:?}");
        }
    }

    // A browser context of its own (another person's browser): no cookie, so 401 everywhere.
    let stranger_context = browser.new_context().await;
    let mut stranger = browser.page(Some(&stranger_context)).await;
    let load = stranger.navigate(&home).await;
    assert_eq!((load.status, load.url.as_str()), (401, home.as_str()));
    let text = stranger.eval_str("document.body.innerText").await;
    assert!(
        text.contains("401 Unauthorized") && text.contains("?burrow_token=<token>"),
        "the edge's 401 page says how to get in: {text}"
    );
    assert_eq!(
        stranger.eval(WEBSOCKET_OUTCOME).await,
        "closed 1006",
        "a WebSocket handshake without the cookie is refused"
    );

    // A wrong token gets no cookie.
    let wrong = format!("{home}?burrow_token=not-the-token");
    let load = stranger.navigate(&wrong).await;
    assert_eq!((load.status, load.redirects.len()), (401, 0), "{load:?}");
    let text = stranger.eval_str("document.body.innerText").await;
    assert!(text.contains("not this tunnel's token"), "{text}");
    let cookies = stranger.cookies(&home).await;
    assert!(cookies.is_empty(), "{cookies:?}");
    let load = stranger.navigate(&second).await;
    assert_eq!(load.status, 401, "{load:?}");

    assert_eq!(
        site.requests().len(),
        seen.len(),
        "nothing from the browser without the cookie reached the app: {:#?}",
        &site.requests()[seen.len()..]
    );
}
