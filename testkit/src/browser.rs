//! Headless Chromium through chromedriver, spoken to over WebDriver's JSON protocol.

use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
}

fn chromium() -> &'static str {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("/usr/bin/chromium")
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless Chromium session.
    pub async fn start() -> anyhow::Result<Browser> {
        Browser::start_with(&[]).await
    }

    /// [`Browser::start`] with extra Chromium flags, e.g.
    /// `--host-resolver-rules=MAP *.previews.acme.com 127.0.0.1`.
    pub async fn start_with(extra_args: &[&str]) -> anyhow::Result<Browser> {
        let port = crate::free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start chromedriver (apt-get install chromium-driver): {e}"))?;
        let mut b = Browser { driver, port, session: String::new() };
        let profile = crate::tempdir("chromium");
        let mut caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium(),
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--disable-background-networking", "--disable-component-update", "--no-first-run",
                         "--disable-sync", "--disable-quic", format!("--user-data-dir={}", profile.display())]
            }
        }}});
        if let Some(args) =
            caps.pointer_mut("/capabilities/alwaysMatch/goog:chromeOptions/args").and_then(|a| a.as_array_mut())
        {
            args.extend(extra_args.iter().map(|a| serde_json::Value::from(*a)));
        }
        let mut last = None;
        for _ in 0..100 {
            match b.call("POST", "/session", Some(caps.clone())).await {
                Ok(v) => {
                    b.session = v["sessionId"].as_str().unwrap_or_default().to_string();
                    return Ok(b);
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no session")))
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let resp = crate::http::send(
            addr,
            method,
            &format!("127.0.0.1:{}", self.port),
            path,
            &[("content-type", "application/json")],
            body,
        )
        .await?;
        let v: Value = serde_json::from_str(&resp.body)?;
        if resp.status >= 400 {
            anyhow::bail!("webdriver {method} {path}: {}", v["value"]["message"]);
        }
        Ok(v["value"].clone())
    }

    fn s(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.call("POST", &self.s("/url"), Some(json!({"url": url}))).await.map(|_| ())
    }

    pub async fn current_url(&self) -> anyhow::Result<String> {
        Ok(self.call("GET", &self.s("/url"), None).await?.as_str().unwrap_or_default().to_string())
    }

    pub async fn page_source(&self) -> anyhow::Result<String> {
        Ok(self.call("GET", &self.s("/source"), None).await?.as_str().unwrap_or_default().to_string())
    }

    pub async fn title(&self) -> anyhow::Result<String> {
        Ok(self.call("GET", &self.s("/title"), None).await?.as_str().unwrap_or_default().to_string())
    }

    /// Clicks the first element matching a CSS selector.
    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        let el = self.call("POST", &self.s("/element"), Some(json!({"using": "css selector", "value": css}))).await?;
        let id = el
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(|v| v.as_str())
            .ok_or_else(|| anyhow::anyhow!("no element id for {css}"))?
            .to_string();
        self.call("POST", &self.s(&format!("/element/{id}/click")), Some(json!({}))).await.map(|_| ())
    }

    /// A PNG screenshot of the viewport.
    pub async fn screenshot(&self) -> anyhow::Result<Vec<u8>> {
        use base64_decode::decode;
        let v = self.call("GET", &self.s("/screenshot"), None).await?;
        Ok(decode(v.as_str().unwrap_or_default()))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // closing the session ends Chromium; then stop the driver we started
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let path = format!("/session/{}", self.session);
        let host = format!("127.0.0.1:{}", self.port);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    crate::http::send(addr, "DELETE", &host, &path, &[], ""),
                )
                .await;
            });
        })
        .join();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

mod base64_decode {
    /// Standard base64 without line breaks, as WebDriver sends screenshots.
    pub fn decode(s: &str) -> Vec<u8> {
        let val = |c: u8| -> Option<u32> {
            match c {
                b'A'..=b'Z' => Some((c - b'A') as u32),
                b'a'..=b'z' => Some((c - b'a') as u32 + 26),
                b'0'..=b'9' => Some((c - b'0') as u32 + 52),
                b'+' => Some(62),
                b'/' => Some(63),
                _ => None,
            }
        };
        let mut out = Vec::with_capacity(s.len() * 3 / 4);
        let (mut acc, mut bits) = (0u32, 0);
        for c in s.bytes().filter_map(val) {
            acc = (acc << 6) | c;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        out
    }
}
