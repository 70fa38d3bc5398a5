//! WebSocket through the edge: a real client (tokio-tungstenite) to a real FastAPI WebSocket
//! endpoint (uvicorn + websockets) through `outpost serve`.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderMap;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::*;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn node_with(server: &str, route: &str) -> (Origin, Node) {
    let origin = Origin::echo("us-west").await;
    let node = Node::start(
        &NodeConfig::new()
            .raw(server)
            .origin("api", &[(&origin, PORTLAND)], "")
            .route("api", "/", "api", route),
    )
    .await;
    (origin, node)
}

/// Opens `/ws/echo` through the node, offering the `chat` subprotocol and a forged internal
/// header; returns the socket, the 101's headers and the origin's first message (what it saw).
async fn open(node: &Node) -> (Socket, HeaderMap, Value) {
    let mut req = format!("ws://{}/ws/echo?room=7", node.addr)
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("sec-websocket-protocol", "chat, other".parse().expect("v"));
    req.headers_mut()
        .insert("x-served-by", "forged".parse().expect("v"));
    let (mut ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(req),
    )
    .await
    .expect("handshake in time")
    .expect("handshake");
    let hello = match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str(t.as_str()).expect("json"),
        other => panic!("expected the origin's hello, got {other:?}"),
    };
    (ws, resp.headers().clone(), hello)
}

/// A WebSocket handshake's bytes for `path`, offering `upgrade`, with `extra` header lines
/// (each ending in CRLF) before the blank line.
fn handshake(path: &str, upgrade: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: edge.test\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
    .into_bytes()
}

/// Waits (20 s at most, `what` otherwise) for the socket to end with no more data: the node
/// closed the connection (it sends no close frame of its own: it carries WebSocket, it does not
/// speak it).
async fn ends_without_data(ws: &mut Socket, what: &str) {
    let end = tokio::time::timeout(Duration::from_secs(20), ws.next())
        .await
        .expect(what);
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{what}: {end:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_frames_go_both_ways_through_the_edge() {
    let (_origin, node) = node_with("", "").await;
    let (mut ws, headers, hello) = open(&node).await;

    // The 101 is the node's: its own fields, the origin's choice of subprotocol.
    assert_eq!(headers["x-served-by"], "test-node");
    assert_eq!(headers["sec-websocket-protocol"], "chat");
    assert!(headers.contains_key("x-request-id"));
    assert!(
        headers["via"]
            .to_str()
            .expect("ascii")
            .contains("test-node"),
        "{headers:?}"
    );

    // The handshake reached the origin like any request: forwarding fields, no forged ones.
    assert_eq!(hello["path"], "/ws/echo");
    assert_eq!(hello["query"], "room=7");
    assert_eq!(echoed(&hello, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(echoed(&hello, "x-forwarded-proto"), ["http"]);
    assert_eq!(echoed(&hello, "upgrade"), ["websocket"]);
    assert_eq!(echoed(&hello, "connection"), ["upgrade"]);
    assert_eq!(echoed(&hello, "x-served-by"), Vec::<&str>::new());
    assert_eq!(echoed(&hello, "x-request-id").len(), 1);
    assert_eq!(echoed(&hello, "traceparent").len(), 1);
    assert!(echoed(&hello, "via")[0].contains("test-node"), "{hello}");

    ws.send(Message::text("héllo, edge")).await.expect("send");
    assert_eq!(next(&mut ws).await, Message::text("héllo, edge"));
    // Larger than any one read on either side, both ways.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.expect("send");
    assert_eq!(next(&mut ws).await, Message::binary(big));
    for i in 0..50 {
        ws.send(Message::text(format!("m{i}"))).await.expect("send");
    }
    for i in 0..50 {
        assert_eq!(next(&mut ws).await, Message::text(format!("m{i}")));
    }

    assert_eq!(node.metric("outpost_http_websockets_open ").await, 1.0);

    // The origin's close (code 4000) reaches the client through the tunnel.
    ws.send(Message::text("bye")).await.expect("send");
    match next(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::from(4000)),
        other => panic!("expected the origin's close, got {other:?}"),
    }
    // The client's half of the closing handshake goes out as the stream is polled to its end:
    // the origin then closes, and the tunnel with it, though the client keeps its socket.
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await
    .expect("the connection ends after the closing handshake");

    // The switch is counted under the route, as a 1xx, when the 101 went out.
    let switches = node
        .metric(r#"outpost_http_requests_total{route="api",status_class="1xx"}"#)
        .await;
    assert_eq!(switches, 1.0);
    // Closed: no longer open (the client still holds its socket), and what it carried is
    // counted, each way.
    eventually(
        "the WebSocket counted closed",
        Duration::from_secs(10),
        || async { node.metric("outpost_http_websockets_open ").await == 0.0 },
    )
    .await;
    for direction in ["to_origin", "to_client"] {
        let bytes = node
            .metric(&format!(
                "outpost_http_websocket_bytes_total{{direction=\"{direction}\"}}"
            ))
            .await;
        assert!(bytes > 300_000.0, "{direction}: {bytes}");
    }
    drop(ws);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_websocket_is_closed_after_the_idle_timeout() {
    let (_origin, node) = node_with("[server]\ntunnel_idle_timeout = \"1s\"\n", "").await;
    let (mut ws, _, _) = open(&node).await;
    ws.send(Message::text("still here")).await.expect("send");
    assert_eq!(next(&mut ws).await, Message::text("still here"));
    let last_byte = Instant::now();
    // Nothing more either way: the node closes both sides.
    ends_without_data(&mut ws, "closed by the node within 20 s").await;
    assert!(
        last_byte.elapsed() >= Duration::from_millis(900),
        "closed {:?} after the last byte, before the 1 s idle timeout",
        last_byte.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn upgrades_other_than_websocket_are_answered_as_plain_requests() {
    let (_origin, node) = node_with("", "").await;
    let raw = raw_exchange(
        node.addr,
        b"GET /echo/h2c HTTP/1.1\r\nHost: edge.test\r\nConnection: Upgrade, HTTP2-Settings\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 200 "), "{raw}");
    let body = &raw[raw.find("\r\n\r\n").expect("head end") + 4..];
    let echo: Value = serde_json::from_str(body).expect("json body");
    for gone in ["upgrade", "http2-settings", "connection"] {
        assert_eq!(echoed(&echo, gone), Vec::<&str>::new(), "{gone}: {echo}");
    }

    // A handshake that offers h2c as well as websocket: only websocket reaches the origin, so
    // a lenient origin cannot be talked into HTTP/2 past the node.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(node.addr)
            .await
            .expect("connect");
        // `Connection` also names HTTP2-Settings, as an h2c upgrade would.
        s.write_all(&handshake(
            "/ws/echo",
            "h2c, websocket",
            "Connection: HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
        ))
        .await
        .expect("write");
        let mut got = Vec::new();
        let read_hello = async {
            // The origin's first frame is its JSON view of the handshake; "region" comes last.
            while !String::from_utf8_lossy(&got).contains("\"region\"") {
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).await.expect("read");
                assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read_hello)
            .await
            .expect("the origin's hello in time");
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 101 "), "{text}");
        assert!(text.contains(r#"["upgrade","websocket"]"#), "{text}");
        assert!(
            !text.contains("h2c") && !text.contains("http2-settings"),
            "{text}"
        );
    }

    // On a route with `websocket = false`, a handshake is a plain request without `Upgrade`.
    let (_origin, node) = node_with("", "websocket = false").await;
    let raw = raw_exchange(
        node.addr,
        &handshake("/echo/ws", "websocket", "Connection: close\r\n"),
        Duration::from_secs(10),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 200 "), "{raw}");
    let body = &raw[raw.find("\r\n\r\n").expect("head end") + 4..];
    let echo: Value = serde_json::from_str(body).expect("json body");
    assert_eq!(echoed(&echo, "upgrade"), Vec::<&str>::new(), "{echo}");

    // A WebSocket handshake on a route that answers by itself is answered, not switched.
    let (_origin, node) = node_with(
        "",
        "respond = { status = 200, body = \"fixed\", content_type = \"text/plain\" }",
    )
    .await;
    let raw = raw_exchange(
        node.addr,
        &handshake("/ws/echo", "websocket", "Connection: close\r\n"),
        Duration::from_secs(10),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 200 "), "{raw}");
    assert!(raw.ends_with("fixed"), "{raw}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_open_websocket_keeps_working_while_the_node_drains() {
    let (_origin, mut node) = node_with("[server]\ndrain_timeout = \"2s\"\n", "").await;
    let (mut ws, _, _) = open(&node).await;
    node.signal(libc::SIGTERM);
    // The listener is closed for new work, but the tunnel is an exchange in flight.
    eventually("/readyz says draining", Duration::from_secs(10), || async {
        client()
            .get(node.admin_url("/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 503)
    })
    .await;
    ws.send(Message::text("during the drain"))
        .await
        .expect("send");
    assert_eq!(next(&mut ws).await, Message::text("during the drain"));
    // At drain_timeout the node exits, cleanly, and the tunnel goes with it.
    let status = node.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}");
    ends_without_data(&mut ws, "the tunnel ends with the node").await;
}

/// A client that resets its connection while the origin is still answering its handshake: the
/// 101 cannot be written, and neither the connection nor the origin's side may be held (a cheap
/// way, otherwise, to use up `max_connections`).
#[tokio::test(flavor = "multi_thread")]
async fn a_handshake_whose_client_is_gone_holds_nothing() {
    use tokio::io::AsyncWriteExt;
    let (_origin, node) = node_with("", "").await;
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(node.addr)
            .await
            .expect("connect");
        // One byte past the handshake keeps hyper from watching for the close; then a reset.
        s.write_all(&[handshake("/ws/echo", "websocket", "").as_slice(), b"x"].concat())
            .await
            .expect("write");
        s.set_zero_linger().expect("linger");
        drop(s);
    }
    assert!(
        node.metrics()
            .await
            .contains("\noutpost_http_active_connections "),
        "the gauge this test reads exists"
    );
    eventually(
        "no connection left open",
        Duration::from_secs(10),
        || async { node.metric("outpost_http_active_connections ").await == 0.0 },
    )
    .await;
}

/// `wss://`: the same tunnel under the node's TLS listener (the client speaks TLS to the node,
/// the node plain HTTP/1.1 to the origin).
#[tokio::test(flavor = "multi_thread")]
async fn websocket_over_tls() {
    let origin = Origin::echo("us-west").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, der) = tls_listener(dir.path());
    let config = config
        .origin("api", &[(&origin, PORTLAND)], "")
        .route("api", "/", "api", "");
    let node = Node::start_in(dir, &config.render()).await;

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(der))
        .expect("trust the test certificate");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(node.addr)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let url = format!("wss://localhost:{}/ws/echo", node.addr.port());
    let (mut ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(url, stream),
    )
    .await
    .expect("handshake in time")
    .expect("handshake");
    assert_eq!(resp.headers()["x-served-by"], "test-node");
    let hello: Value = match next(&mut ws).await {
        Message::Text(t) => serde_json::from_str(t.as_str()).expect("json"),
        other => panic!("expected the origin's hello, got {other:?}"),
    };
    assert_eq!(echoed(&hello, "x-forwarded-proto"), ["https"]);
    ws.send(Message::text("over TLS")).await.expect("send");
    assert_eq!(next(&mut ws).await, Message::text("over TLS"));
}

/// The next message on a WebSocket stream, plain or TLS (10 s at most).
async fn next<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(m))) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}
