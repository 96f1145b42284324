//! The deployment log's line format, shared by the receiver, which writes it,
//! and `nx logs`, which shows it.
//!
//! Each stored line is `<timestamp> <text>`. The platform's own lines start
//! their text with [`PLATFORM_MARK`]; an app's line never does: one that would
//! (once whatever does not show is skipped) is stored behind [`APP_MARK`]. An
//! app's bytes are stored as printed; what a terminal would act on instead of
//! show is neutralised when `nx logs` writes to one ([`neutralise`]).

use std::borrow::Cow;
use std::fmt::Write as _;

/// Starts the text of the platform's lines, and of no app line.
pub const PLATFORM_MARK: &str = "[nx]";

/// Put before an app's line that would otherwise start with [`PLATFORM_MARK`].
pub const APP_MARK: &str = "[app]";

/// Whether `c` changes how the text around it looks without showing itself:
/// control characters (escape sequences, carriage return, backspace),
/// bidirectional overrides and isolates, zero-width and other invisible
/// formatting characters.
pub fn is_hidden(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00ad}' | '\u{034f}' | '\u{061c}' | '\u{115f}' | '\u{1160}' | '\u{17b4}' | '\u{17b5}'
            | '\u{180b}'..='\u{180f}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}' | '\u{3164}' | '\u{fe00}'..='\u{fe0f}' | '\u{feff}' | '\u{ffa0}'
            | '\u{fff9}'..='\u{fffb}' | '\u{1bca0}'..='\u{1bca3}' | '\u{1d173}'..='\u{1d17a}'
            | '\u{e0000}'..='\u{e0fff}')
}

/// Whether an app's line could pass for one of the platform's: once leading
/// blanks and hidden characters are skipped and the text is folded
/// ([`fold`]), it starts with [`PLATFORM_MARK`], or with anything shaped like
/// it that is not plainly another ASCII tag: a two-letter tag between two
/// marks that are not letters or digits, whose letters fold to `n` and `x`
/// or are not ASCII (`〘nx〙`, `[ꞑx]`, `⟮nꭓ⟯`). A list of lookalikes can never
/// be complete; the shape can. Or the line holds the mark and any hidden
/// character (an escape sequence or a carriage return can make a terminal
/// show the mark first).
pub fn looks_like_platform(line: &str) -> bool {
    let shown = line.trim_start_matches(|c: char| c.is_whitespace() || is_hidden(c));
    let head: Vec<char> = fold(shown).take(4).collect();
    let tag_like = match head.as_slice() {
        [open, a, b, close] => {
            let mark = |c: &char| !c.is_alphanumeric() && !c.is_whitespace();
            let letter = |c: &char, plain: char| *c == plain || (c.is_alphabetic() && !c.is_ascii());
            mark(open) && mark(close) && letter(a, 'n') && letter(b, 'x')
        }
        _ => false,
    };
    tag_like || (line.chars().any(is_hidden) && fold(line).collect::<String>().contains(PLATFORM_MARK))
}

/// `text` as a reader would take it: compatibility forms (fullwidth `［ｎｘ］`,
/// mathematical `𝐧𝐱`, circled `ⓝ`) decomposed to their plain letters,
/// accents and other combining marks dropped (`n̲x`, `nx́`), hidden
/// characters dropped, letters lowercased, and the Cyrillic, Greek and
/// Armenian letters and brackets that look like those of the mark replaced
/// by them.
fn fold(text: &str) -> impl Iterator<Item = char> + '_ {
    use unicode_normalization::char::is_combining_mark;
    use unicode_normalization::UnicodeNormalization as _;
    text.nfkd().filter(|c| !is_hidden(*c) && !is_combining_mark(*c)).flat_map(char::to_lowercase).map(|c| match c {
        'х' | 'χ' | 'ҳ' | 'ӽ' | 'ӿ' | '×' | '⨯' | '᙮' => 'x',
        'п' | 'ո' | 'ռ' | 'ɴ' | 'ח' | 'η' | 'ŋ' => 'n',
        '⟦' | '〚' | '〔' | '【' | '〖' | '⁅' | '⦋' | '⦍' | '⦏' => '[',
        '⟧' | '〛' | '〕' | '】' | '〗' | '⁆' | '⦌' | '⦎' | '⦐' => ']',
        c => c,
    })
}

/// `line` with every hidden character but the tab shown as an escape (`\x1b`,
/// `\u{202e}`), so that a terminal shows it instead of acting on it, and a
/// backslash doubled where it starts something that reads as one.
pub fn neutralise(line: &str) -> Cow<'_, str> {
    if !line.chars().any(|c| c != '\t' && is_hidden(c)) {
        return Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len() + 16);
    for c in line.chars() {
        match c {
            '\t' => out.push(c),
            c if is_hidden(c) && (c as u32) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if is_hidden(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// One line of the router's access log, as nx-router writes it (one JSON
/// object a line) and the receiver reads it to pass each app its own lines
/// (log drains). Borrowed, so the router serializes without copying.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AccessLine<'a> {
    /// When the request ended, in microseconds since the Unix epoch.
    pub ts: u64,
    #[serde(borrow)]
    pub host: Cow<'a, str>,
    #[serde(borrow)]
    pub method: Cow<'a, str>,
    #[serde(borrow)]
    pub path: Cow<'a, str>,
    /// 0 when no response was sent.
    pub status: u16,
    /// Empty when the host routes to no deployment.
    #[serde(borrow)]
    pub app: Cow<'a, str>,
    #[serde(borrow)]
    pub deployment: Cow<'a, str>,
    #[serde(borrow)]
    pub request_id: Cow<'a, str>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub client_request_id: Option<Cow<'a, str>>,
    /// How long the request took, in microseconds.
    pub micros: u64,
    /// Body bytes read from the client.
    pub bytes_in: u64,
    /// Body bytes sent to the client.
    pub bytes_out: u64,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Cow<'a, str>>,
}

impl AccessLine<'_> {
    /// Appends the line as JSON, byte for byte what `serde_json` writes for
    /// it (the receiver reads it with `serde_json`), without a newline.
    ///
    /// Written by hand because the router writes one per request: serde's
    /// walk through the fields costs several times this loop (see
    /// bench/RESULTS.md, "Router").
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"ts\":");
        push_number(out, self.ts);
        push_field(out, "host", &self.host);
        push_field(out, "method", &self.method);
        push_field(out, "path", &self.path);
        out.extend_from_slice(b",\"status\":");
        push_number(out, u64::from(self.status));
        push_field(out, "app", &self.app);
        push_field(out, "deployment", &self.deployment);
        push_field(out, "request_id", &self.request_id);
        if let Some(id) = &self.client_request_id {
            push_field(out, "client_request_id", id);
        }
        out.extend_from_slice(b",\"micros\":");
        push_number(out, self.micros);
        out.extend_from_slice(b",\"bytes_in\":");
        push_number(out, self.bytes_in);
        out.extend_from_slice(b",\"bytes_out\":");
        push_number(out, self.bytes_out);
        if let Some(error) = &self.error {
            push_field(out, "error", error);
        }
        out.push(b'}');
    }
}

/// `,"name":"value"`, the value escaped as `serde_json` escapes it: `"`, `\`
/// and the control characters below 0x20 (the usual five by their short
/// escapes, the rest as `\u00xx`); everything else as it is.
fn push_field(out: &mut Vec<u8>, name: &str, value: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":\"");
    let bytes = value.as_bytes();
    let mut plain = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0x08 => b'b',
            0x0c => b'f',
            0x00..=0x1f => 0,
            _ => continue,
        };
        out.extend_from_slice(&bytes[plain..i]);
        plain = i + 1;
        if short == 0 {
            out.extend_from_slice(b"\\u00");
            out.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        } else {
            out.extend_from_slice(&[b'\\', short]);
        }
    }
    out.extend_from_slice(&bytes[plain..]);
    out.push(b'"');
}

/// `n` in decimal.
fn push_number(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_access_line_is_written_as_serde_json_writes_it() {
        let awkward = [
            "",
            "plain",
            "quote \" and backslash \\ and slash /",
            "\n\r\t\u{8}\u{c}\u{0}\u{1}\u{1f}\u{7f}",
            "é ✓ 𝄞 \u{2028}\u{feff}",
            "\\u0041",
            "/a?b=c&d=%22",
        ];
        for (i, text) in awkward.iter().enumerate() {
            let line = AccessLine {
                ts: [0, 1, u64::MAX][i % 3],
                host: Cow::Borrowed(text),
                method: "GET".into(),
                path: Cow::Borrowed(text),
                status: [0, 200, 599][i % 3],
                app: Cow::Borrowed(text),
                deployment: "d".into(),
                request_id: Cow::Borrowed(text),
                client_request_id: (i % 2 == 0).then_some(Cow::Borrowed(*text)),
                micros: 10_u64.pow(i as u32),
                bytes_in: i as u64,
                bytes_out: u64::MAX - i as u64,
                error: (i % 2 == 1).then_some(Cow::Borrowed(*text)),
            };
            let mut ours = Vec::new();
            line.write_json(&mut ours);
            assert_eq!(String::from_utf8(ours).unwrap(), serde_json::to_string(&line).unwrap(), "for {text:?}");
        }
    }

    #[test]
    fn an_app_line_passes_for_the_platform_only_with_the_mark_first() {
        for forged in
            ["[nx] healthy on 127.0.0.1:1", "  [nx] x", "\u{1b}[0m[nx] x", "\u{200b}[nx] x", "\r[nx] x", "ok\r[nx] x"]
                .into_iter()
                .chain(["\u{fe0f}[nx] x", "\u{34f}[nx] x", "\u{3164}[nx] x", "\u{e0041}[nx] x", "\u{17b4}[nx] x"])
                .chain([
                    "［ｎｘ］ deployed",
                    "[nх] deployed",
                    "[пx] x",
                    "【nx】 x",
                    "[NX] x",
                    "[𝐧𝐱] x",
                    "[ⓝⓧ] x",
                    "[n\u{200b}x] x",
                ])
        {
            assert!(looks_like_platform(forged), "{forged:?}");
        }
        for honest in [
            "hello [nx]",
            "[nxx]",
            "nx: started",
            "\u{1b}[31mred\u{1b}[0m",
            "",
            "[nginx] up",
            "hello ［ｎｘ］",
            "[ok] fine",
            "(ab) c",
            "[n] x",
            "nx: up",
        ] {
            assert!(!looks_like_platform(honest), "{honest:?}");
        }
    }

    #[test]
    fn terminal_controls_are_shown_not_acted_on() {
        assert_eq!(neutralise("plain\ttext é"), "plain\ttext é");
        assert!(matches!(neutralise("plain"), Cow::Borrowed(_)));
        assert_eq!(neutralise("\u{1b}]0;title\u{7}red\u{1b}[31m"), "\\x1b]0;title\\x07red\\x1b[31m");
        assert_eq!(neutralise("ok\rno\u{8}\u{7f}"), "ok\\x0dno\\x08\\x7f");
        assert_eq!(neutralise("\u{9b}2J"), "\\x9b2J", "the one-byte CSI");
        assert_eq!(neutralise("abc\u{202e}fed\u{200b}"), "abc\\u{202e}fed\\u{200b}");
    }
}
