//! A small HTTP/1.1 client: one request per connection, the response read to the end into a
//! [`Reply`]; and [`wait_for`], polling a condition against a deadline.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;

/// A response with its body read to the end (or the error that cut it short).
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Result<Bytes, String>,
}

impl Reply {
    pub fn bytes(&self) -> Bytes {
        self.body
            .clone()
            .unwrap_or_else(|e| panic!("body failed: {e}"))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.bytes())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The first registry error code of a JSON error body.
    pub fn error_code(&self) -> String {
        self.json()["errors"][0]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
}

pub async fn send(method: Method, url: &str, headers: &[(&str, &str)]) -> Reply {
    let resp = match try_send_head(method, url, headers).await {
        Ok(resp) => resp,
        // The server closed the connection before a response: an aborted transfer, which
        // tests of failing downloads expect to see.
        Err(e) => {
            return Reply {
                status: StatusCode::from_u16(599).unwrap(),
                headers: HeaderMap::new(),
                body: Err(format!("no response: {e}")),
            }
        }
    };
    read_reply(resp).await
}

/// Sends a request and returns as soon as the response headers are in.
pub async fn send_head(method: Method, url: &str, headers: &[(&str, &str)]) -> Response<Incoming> {
    try_send_head(method, url, headers).await.unwrap()
}

async fn try_send_head(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Response<Incoming>, hyper::Error> {
    try_send(method, url, headers, Empty::<Bytes>::new()).await
}

/// Sends one request on a new HTTP/1.1 connection; returns when the response headers are in.
async fn try_send<B>(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: B,
) -> Result<Response<Incoming>, hyper::Error>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let uri: http::Uri = url.parse().unwrap();
    let authority = uri.authority().unwrap().clone();
    let stream = tokio::net::TcpStream::connect(authority.as_str())
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(uri.path_and_query().unwrap().as_str())
        .header("host", authority.as_str());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    sender.send_request(req.body(body).unwrap()).await
}

/// Sends a request with a body (with its Content-Length) and reads the response.
pub async fn send_body(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    send_any(method, url, headers, Full::new(body.into())).await
}

/// Sends a request whose body is streamed in these chunks, without a Content-Length (chunked
/// transfer encoding), and reads the response.
pub async fn send_stream(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    chunks: Vec<Bytes>,
) -> Reply {
    let stream = futures_util::stream::iter(
        chunks
            .into_iter()
            .map(|c| Ok::<_, std::io::Error>(Frame::data(c))),
    );
    send_any(method, url, headers, StreamBody::new(stream)).await
}

async fn send_any<B>(method: Method, url: &str, headers: &[(&str, &str)], body: B) -> Reply
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let resp = try_send(method, url, headers, body).await.unwrap();
    read_reply(resp).await
}

/// Reads a response's body to the end (or to the error that cuts it short).
async fn read_reply(resp: Response<Incoming>) -> Reply {
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string());
    Reply {
        status,
        headers,
        body,
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0 to find a free port")
        .port()
}

/// Waits for a condition with a deadline, re-checking when woken by time slices.
pub async fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + deadline;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends a GET from its own task (owning its arguments), for concurrent clients.
pub fn spawn_get(url: &str, headers: &[(&str, &str)]) -> tokio::task::JoinHandle<Reply> {
    let url = url.to_owned();
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::spawn(async move {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        send(Method::GET, &url, &h).await
    })
}
