//! A loopback HTTP server for download tests: serves artifacts by path and
//! misbehaves on request (404, truncated bodies, stalls, failures before a
//! success). Raw HTTP/1.1 on a std TcpListener, so every byte is the test's.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How a path answers.
#[derive(Debug, Clone)]
pub enum Route {
    /// 200 with these bytes.
    Body(Vec<u8>),
    /// A status code and no body.
    Status(u16),
    /// Claims the full length, sends only the first `sent` bytes, closes.
    Truncated { body: Vec<u8>, sent: usize },
    /// Sends headers, then nothing for this long.
    Stall(Duration),
    /// 503 for the first `failures` requests, then the body.
    Flaky { failures: usize, body: Vec<u8> },
    /// 302 to this URL.
    Redirect(String),
    /// Claims a body of this many bytes, sends a few, closes.
    Claims(u64),
}

pub struct ArtifactServer {
    pub addr: SocketAddr,
    routes: Arc<Mutex<BTreeMap<String, Route>>>,
    hits: Arc<Mutex<BTreeMap<String, usize>>>,
    stop: Arc<AtomicBool>,
}

impl ArtifactServer {
    pub fn start() -> ArtifactServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let routes: Arc<Mutex<BTreeMap<String, Route>>> = Arc::default();
        let hits: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (r, h, s) = (routes.clone(), hits.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let (r, h) = (r.clone(), h.clone());
                std::thread::spawn(move || answer(stream, &r, &h));
            }
        });
        ArtifactServer {
            addr,
            routes,
            hits,
            stop,
        }
    }

    pub fn route(&self, path: &str, route: Route) {
        self.routes.lock().unwrap().insert(path.to_string(), route);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// Stops answering: connections are refused from now on.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

impl Drop for ArtifactServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn answer(
    mut stream: TcpStream,
    routes: &Mutex<BTreeMap<String, Route>>,
    hits: &Mutex<BTreeMap<String, usize>>,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut request = Vec::new();
    let mut buffer = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buffer[..n]),
        }
    }
    let text = String::from_utf8_lossy(&request);
    let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
    let count = {
        let mut hits = hits.lock().unwrap();
        let n = hits.entry(path.clone()).or_default();
        *n += 1;
        *n
    };
    let route = routes
        .lock()
        .unwrap()
        .get(&path)
        .cloned()
        .unwrap_or(Route::Status(404));
    let head = |status: u16, length: usize| {
        format!("HTTP/1.1 {status} X\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n")
            .into_bytes()
    };
    let _ = match route {
        Route::Body(body) => stream.write_all(&[head(200, body.len()), body].concat()),
        Route::Status(status) => stream.write_all(&head(status, 0)),
        Route::Truncated { body, sent } => {
            stream.write_all(&[head(200, body.len()), body[..sent].to_vec()].concat())
        }
        Route::Stall(time) => {
            let _ = stream.write_all(&head(200, 1000));
            std::thread::sleep(time);
            Ok(())
        }
        Route::Flaky { failures, body } if count <= failures => {
            stream.write_all(&head(503, 0)).map(|_| drop(body))
        }
        Route::Flaky { body, .. } => stream.write_all(&[head(200, body.len()), body].concat()),
        Route::Redirect(to) => stream.write_all(
            format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        ),
        Route::Claims(length) => stream.write_all(
            format!("HTTP/1.1 200 OK\r\nContent-Length: {length}\r\nConnection: close\r\n\r\nxxxx")
                .as_bytes(),
        ),
    };
}
