//! Dependency lists embedded by cargo-auditable: a zlib-compressed JSON document
//! in the `.dep-v0` section.

use serde::Deserialize;

use crate::report::RustDependency;

/// The section cargo-auditable writes.
pub const SECTION: &str = ".dep-v0";
/// Refuse to inflate more than this: the section comes from an untrusted file.
const MAX_JSON: usize = 8 << 20;

#[derive(Deserialize)]
struct Doc {
    packages: Vec<Package>,
}

#[derive(Deserialize)]
struct Package {
    name: String,
    version: String,
}

/// Decodes the section's contents.
pub fn decode(compressed: &[u8]) -> Result<Vec<RustDependency>, String> {
    let json = miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(compressed, MAX_JSON)
        .map_err(|e| format!("{SECTION} does not inflate: {e:?}"))?;
    let doc: Doc = serde_json::from_slice(&json).map_err(|e| format!("{SECTION} is not valid JSON: {e}"))?;
    Ok(doc.packages.into_iter().map(|p| RustDependency { name: p.name, version: p.version }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_are_listed() {
        let json = br#"{"packages":[{"name":"serde","version":"1.0.200","source":"crates.io"},{"name":"app","version":"0.1.0","source":"local","root":true}]}"#;
        let compressed = miniz_oxide::deflate::compress_to_vec_zlib(json, 6);
        let deps = decode(&compressed).unwrap();
        assert_eq!(deps.len(), 2);
        assert_eq!(deps[0], RustDependency { name: "serde".into(), version: "1.0.200".into() });
        assert!(decode(b"garbage").is_err());
    }
}
