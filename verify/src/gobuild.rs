//! Go's embedded build information (what `go version -m` prints), read from the
//! `.go.buildinfo` blob: a 32-byte header starting with `\xff Go buildinf:`,
//! then, since Go 1.18, the Go version and the module information as
//! length-prefixed strings.

use crate::report::GoBuildInfo;

const MAGIC: &[u8] = b"\xff Go buildinf:";
const HEADER_LEN: usize = 32;
/// Flag bit: strings are inline after the header (Go 1.18 and later).
const FLAG_INLINE: u8 = 0x2;
/// The longest field kept (a module path's limit in Go is far less); the
/// file is hostile and says how long its strings are.
const MAX_FIELD: usize = 4096;

/// Finds the header anywhere in `data` (for files whose section table does not
/// name the blob). The magic string also appears in programs that merely know
/// it (this crate, for one), so only a header that parses into a Go version
/// counts.
pub fn find(data: &[u8]) -> Option<Result<GoBuildInfo, String>> {
    memchr::memmem::find_iter(data, MAGIC).find_map(|off| parse(&data[off..]).ok()).map(Ok)
}

/// Parses a blob that starts with the header.
pub fn parse(blob: &[u8]) -> Result<GoBuildInfo, String> {
    if blob.len() < HEADER_LEN || !blob.starts_with(MAGIC) {
        return Err("Go build info header is truncated".into());
    }
    let (ptr_size, flags) = (blob[14], blob[15]);
    if ptr_size != 4 && ptr_size != 8 {
        return Err(format!("Go build info has pointer size {ptr_size}"));
    }
    if flags & FLAG_INLINE == 0 {
        return Err("Go build info predates Go 1.18 and is not read".into());
    }
    let mut rest = &blob[HEADER_LEN..];
    let version = read_string(&mut rest).ok_or("Go version string is truncated")?;
    let modinfo = read_string(&mut rest).unwrap_or_default();
    if !(version.starts_with(b"go") || version.starts_with(b"devel")) || version.len() > MAX_FIELD {
        return Err("Go build info holds no Go version".into());
    }
    let mut info = GoBuildInfo { go_version: String::from_utf8_lossy(version).into_owned(), ..Default::default() };
    // The module text is framed by 16-byte sentinels.
    let text = if modinfo.len() >= 33 && modinfo[modinfo.len() - 17] == b'\n' {
        &modinfo[16..modinfo.len() - 16]
    } else {
        modinfo
    };
    // Read in place, line by line: the text is as long as the file says, and
    // only a few short fields of it are kept.
    for line in text.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut fields = line.split(|b| *b == b'\t');
        match (fields.next(), fields.next()) {
            (Some(b"path"), Some(p)) => info.path = field(p),
            (Some(b"mod"), Some(m)) => info.main_module = field(m),
            (Some(b"build"), Some(kv)) => {
                let Some(eq) = kv.iter().position(|b| *b == b'=') else { continue };
                let (key, value) = (&kv[..eq], &kv[eq + 1..]);
                match key {
                    b"GOOS" => info.goos = field(value),
                    b"GOARCH" => info.goarch = field(value),
                    b"CGO_ENABLED" => info.cgo_enabled = Some(value == b"1"),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    Ok(info)
}

/// A field's text, when it is no longer than a field can be.
fn field(bytes: &[u8]) -> Option<String> {
    (bytes.len() <= MAX_FIELD).then(|| String::from_utf8_lossy(bytes).into_owned())
}

fn read_uvarint(buf: &mut &[u8]) -> Option<u64> {
    let mut value: u64 = 0;
    for i in 0..10 {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn read_string<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(read_uvarint(buf)?).ok()?;
    if len > buf.len() {
        return None;
    }
    let (s, rest) = buf.split_at(len);
    *buf = rest;
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(version: &str, modinfo: &str) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.push(8);
        b.push(FLAG_INLINE);
        b.resize(HEADER_LEN, 0);
        for s in [version.as_bytes().to_vec(), {
            let mut m = vec![b'x'; 16];
            m.extend_from_slice(modinfo.as_bytes());
            m.extend_from_slice(&[b'y'; 16]);
            m
        }] {
            let mut n = s.len();
            while n >= 0x80 {
                b.push((n as u8) | 0x80);
                n >>= 7;
            }
            b.push(n as u8);
            b.extend_from_slice(&s);
        }
        b
    }

    #[test]
    fn module_and_build_settings_are_read() {
        let info = parse(&blob(
            "go1.19.8",
            "path\texample.com/hello\nmod\texample.com/hello\t(devel)\t\nbuild\tCGO_ENABLED=0\nbuild\tGOARCH=arm64\nbuild\tGOOS=darwin\n",
        ))
        .unwrap();
        assert_eq!(info.go_version, "go1.19.8");
        assert_eq!(info.path.as_deref(), Some("example.com/hello"));
        assert_eq!(info.main_module.as_deref(), Some("example.com/hello"));
        assert_eq!(info.goos.as_deref(), Some("darwin"));
        assert_eq!(info.goarch.as_deref(), Some("arm64"));
        assert_eq!(info.cgo_enabled, Some(false));
    }

    #[test]
    fn truncated_blobs_are_errors_not_panics() {
        let b = blob("go1.21.0", "path\tx\n");
        for len in 0..b.len() {
            let _ = parse(&b[..len]);
        }
        assert!(parse(&b[..20]).is_err());
    }

    #[test]
    fn the_header_is_found_at_aligned_offsets() {
        let mut data = vec![0u8; 64];
        data.extend(blob("go1.22.1", "path\tp\n"));
        assert_eq!(find(&data).unwrap().unwrap().go_version, "go1.22.1");
        assert!(find(&[0u8; 100]).is_none());
    }
}
