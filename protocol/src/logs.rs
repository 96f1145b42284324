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
        // The fixed text and the numbers fit in this; the values are added.
        let values = [&self.host, &self.method, &self.path, &self.app, &self.deployment, &self.request_id];
        out.reserve(256 + values.iter().map(|v| v.len()).sum::<usize>());
        out.extend_from_slice(b"{\"ts\":");
        push_number(out, self.ts);
        push_field(out, b",\"host\":\"", &self.host);
        push_field(out, b",\"method\":\"", &self.method);
        push_field(out, b",\"path\":\"", &self.path);
        out.extend_from_slice(b",\"status\":");
        push_number(out, u64::from(self.status));
        push_field(out, b",\"app\":\"", &self.app);
        push_field(out, b",\"deployment\":\"", &self.deployment);
        push_field(out, b",\"request_id\":\"", &self.request_id);
        if let Some(id) = &self.client_request_id {
            push_field(out, b",\"client_request_id\":\"", id);
        }
        out.extend_from_slice(b",\"micros\":");
        push_number(out, self.micros);
        out.extend_from_slice(b",\"bytes_in\":");
        push_number(out, self.bytes_in);
        out.extend_from_slice(b",\"bytes_out\":");
        push_number(out, self.bytes_out);
        if let Some(error) = &self.error {
            push_field(out, b",\"error\":\"", error);
        }
        out.push(b'}');
    }
}

/// How `serde_json` escapes each byte of a string: 0, not at all; `u`, as
/// `\u00xx` (the control characters without a short escape); otherwise the
/// character after the backslash. A table, as `serde_json` has, because the
/// router looks up every byte of every line.
const ESCAPE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = b'u';
        b += 1;
    }
    table[b'\n' as usize] = b'n';
    table[b'\r' as usize] = b'r';
    table[b'\t' as usize] = b't';
    table[0x08] = b'b';
    table[0x0c] = b'f';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

/// `key` (`,"name":"`, written whole), then the value escaped as
/// `serde_json` escapes it ([`ESCAPE`]) and its closing quote. Inlined into
/// [`AccessLine::write_json`], where each key is a constant: its copy is a
/// few stores rather than a call to `memcpy`, which cost more than the
/// copy for keys this short. Values that need escaping, almost none, take
/// [`push_escaped`].
#[inline(always)]
fn push_field(out: &mut Vec<u8>, key: &[u8], value: &str) {
    out.extend_from_slice(key);
    let bytes = value.as_bytes();
    if needs_escape(bytes) {
        push_escaped(out, bytes);
    } else {
        out.extend_from_slice(bytes);
    }
    out.push(b'"');
}

/// `bytes` escaped as `serde_json` escapes them ([`ESCAPE`]).
#[cold]
#[inline(never)]
fn push_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut plain = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape = ESCAPE[usize::from(b)];
        if escape == 0 {
            continue;
        }
        out.extend_from_slice(&bytes[plain..i]);
        plain = i + 1;
        if escape == b'u' {
            out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        } else {
            out.extend_from_slice(&[b'\\', escape]);
        }
    }
    out.extend_from_slice(&bytes[plain..]);
}

/// Whether any byte of `bytes` is escaped ([`ESCAPE`]): below 0x20, `"` or
/// `\`. Eight bytes at a time, since almost no value has one: a byte below
/// 0x20 is one whose subtraction of 0x20 borrows while its top bit was
/// clear, a byte equal to `c` is a zero byte of the word XOR `c` (the usual
/// word-at-a-time tests, exact as a yes or no).
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const TOPS: u64 = 0x8080_8080_8080_8080;
    let below = |x: u64, n: u64| x.wrapping_sub(ONES * n) & !x & TOPS;
    let mut words = bytes.chunks_exact(8);
    for chunk in &mut words {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word);
        if below(x, 0x20) | below(x ^ (ONES * u64::from(b'"')), 1) | below(x ^ (ONES * u64::from(b'\\')), 1) != 0 {
            return true;
        }
    }
    words.remainder().iter().any(|&b| ESCAPE[usize::from(b)] != 0)
}

/// `n` in decimal.
#[inline(always)]
fn push_number(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
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
        ]
        .map(String::from);
        // And every character up to U+00FF, each in its place.
        let every: String = (0..=0xffu8).map(char::from).collect();
        for (i, text) in awkward.iter().chain([&every]).map(String::as_str).enumerate() {
            let line = AccessLine {
                ts: [0, 1, u64::MAX][i % 3],
                host: Cow::Borrowed(text),
                method: "GET".into(),
                path: Cow::Borrowed(text),
                status: [0, 200, 599][i % 3],
                app: Cow::Borrowed(text),
                deployment: "d".into(),
                request_id: Cow::Borrowed(text),
                client_request_id: (i % 2 == 0).then_some(Cow::Borrowed(text)),
                micros: 10_u64.pow(i as u32),
                bytes_in: i as u64,
                bytes_out: u64::MAX - i as u64,
                error: (i % 2 == 1).then_some(Cow::Borrowed(text)),
            };
            let mut ours = Vec::new();
            line.write_json(&mut ours);
            assert_eq!(String::from_utf8(ours).unwrap(), serde_json::to_string(&line).unwrap(), "for {text:?}");
        }
    }

    #[test]
    fn every_escaped_byte_is_found_wherever_it_stands_in_a_long_value() {
        let others = ["a", " ", "!", "#", "[", "]", "~", "\u{7f}", "é", "✓"];
        for special in ["\"", "\\", "\u{0}", "\u{1}", "\n", "\u{1f}"] {
            for len in [1, 7, 8, 9, 16, 17, 33] {
                for at in 0..len {
                    let fill = others[(len + at) % others.len()];
                    let text: String = (0..len).map(|i| if i == at { special } else { fill }).collect();
                    let mut ours = Vec::new();
                    push_field(&mut ours, b"", &text);
                    let json = serde_json::to_string(&text).unwrap();
                    assert_eq!(String::from_utf8(ours).unwrap(), &json[1..], "for {text:?}");
                }
            }
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
