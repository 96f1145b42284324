//! The pages the router answers itself when it cannot or should not proxy.

/// A page: status, a short title and an explanation saying what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub status: u16,
    pub title: &'static str,
    pub message: String,
    pub kind: PageKind,
}

/// What a page is besides its HTML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageKind {
    /// The HTML page alone.
    Html,
    /// This text instead of HTML (an ACME key authorization, which the CA
    /// compares byte for byte).
    Text(String),
    /// A redirect to this URL (`Location`), with the HTML page as its body.
    Redirect(String),
}

impl Page {
    pub fn unknown_host(host: &str) -> Page {
        Page {
            status: 404,
            title: "No app here",
            message: format!(
                "No deployment is routed at {host}. Check the URL printed by `nx push` or listed by `nx ls`."
            ),
            kind: PageKind::Html,
        }
    }

    pub fn starting(app: &str, deployment: &str) -> Page {
        Page {
            status: 503,
            title: "Starting",
            message: format!("Deployment {deployment} of {app} is starting. This page reloads by itself."),
            kind: PageKind::Html,
        }
    }

    pub fn stopped(app: &str, deployment: &str, reason: Option<&str>) -> Page {
        let why = reason.map(|r| format!(" ({r})")).unwrap_or_default();
        Page {
            status: 410,
            title: "Preview stopped",
            message: format!(
                "Deployment {deployment} of {app} was stopped{why}. Push again, or ask its owner to, for a new preview."
            ),
            kind: PageKind::Html,
        }
    }

    pub fn failed(app: &str, deployment: &str) -> Page {
        Page {
            status: 502,
            title: "Deployment failed",
            message: format!("Deployment {deployment} of {app} failed to start. `nx logs {deployment}` shows why."),
            kind: PageKind::Html,
        }
    }

    /// A sleeping deployment could not be started for a held request; the
    /// next request after `Retry-After` tries again.
    pub fn wake_failed(app: &str, deployment: &str) -> Page {
        Page {
            status: 503,
            title: "Could not wake",
            message: format!(
                "Deployment {deployment} of {app} was asleep and did not start. `nx logs {deployment}` shows what it printed; the next request tries again."
            ),
            kind: PageKind::Html,
        }
    }

    /// A sleeping deployment did not wake within the time a request is held.
    pub fn wake_timeout(app: &str, deployment: &str) -> Page {
        Page {
            status: 503,
            title: "Still waking",
            message: format!(
                "Deployment {deployment} of {app} was asleep and is not up yet. This page reloads by itself."
            ),
            kind: PageKind::Html,
        }
    }

    /// More requests wait for a sleeping deployment than the router holds.
    pub fn wake_busy(app: &str, deployment: &str) -> Page {
        Page {
            status: 503,
            title: "Waking",
            message: format!(
                "Deployment {deployment} of {app} is waking and too many requests already wait for it. This page reloads by itself."
            ),
            kind: PageKind::Html,
        }
    }

    pub fn upstream_down(app: &str, deployment: &str) -> Page {
        Page {
            status: 502,
            title: "App not answering",
            message: format!(
                "Deployment {deployment} of {app} did not answer. It may be restarting; `nx logs {deployment}` shows what it printed."
            ),
            kind: PageKind::Html,
        }
    }

    pub fn upstream_timeout(app: &str, deployment: &str) -> Page {
        Page {
            status: 504,
            title: "App too slow",
            message: format!(
                "Deployment {deployment} of {app} did not answer in time. `nx logs {deployment}` shows what it is doing."
            ),
            kind: PageKind::Html,
        }
    }

    /// The answer to an ACME HTTP-01 challenge: the key authorization as text.
    pub fn challenge(key_authorization: String) -> Page {
        Page { status: 200, title: "ACME challenge", message: String::new(), kind: PageKind::Text(key_authorization) }
    }

    /// A permanent redirect of a plain HTTP request to `location` (308
    /// keeps the method and body).
    pub fn redirect(location: String) -> Page {
        Page {
            status: 308,
            title: "Moved to HTTPS",
            message: format!("This site is served over HTTPS at {location}."),
            kind: PageKind::Redirect(location),
        }
    }

    /// The HTML body.
    pub fn html(&self) -> String {
        let refresh = if self.status == 503 { "<meta http-equiv=\"refresh\" content=\"2\">" } else { "" };
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\">{refresh}<title>{status} {title}</title>\
             <style>body{{font:16px system-ui,sans-serif;max-width:40em;margin:4em auto;padding:0 1em;color:#222}}\
             small{{color:#777}}</style></head><body><h1>{title}</h1><p>{message}</p>\
             <p><small>{status} &middot; nx-router</small></p></body></html>\n",
            status = self.status,
            title = self.title,
            message = escape(&self.message),
        )
    }
}

/// Escapes text for HTML; hosts come from the client and must not inject markup.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_supplied_hosts_cannot_inject_markup() {
        let html = Page::unknown_host("<script>alert(1)</script>").html();
        assert!(!html.contains("<script>"));
        assert!(html.contains("&lt;script&gt;"));
    }

    #[test]
    fn starting_pages_reload_and_others_do_not() {
        assert!(Page::starting("web", "abcdefgh").html().contains("refresh"));
        assert!(!Page::stopped("web", "abcdefgh", None).html().contains("refresh"));
        assert_eq!(Page::stopped("web", "abcdefgh", None).status, 410);
        let idle = Page::stopped("web", "abcdefgh", Some("no requests for 7 days")).html();
        assert!(idle.contains("was stopped (no requests for 7 days)"), "{idle}");
    }
}
