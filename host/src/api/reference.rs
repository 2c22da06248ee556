//! The HTTP API reference in Markdown (`docs/api.md`), generated from the OpenAPI document.
//!
//! `openapi.json` is the one description of the API; this renders it for people, so the two
//! cannot drift apart: a test compares `docs/api.md` with a fresh rendering.

use std::fmt::Write as _;

use serde_json::{Map, Value};

/// The command that rewrites `docs/api.md`; error messages name it.
pub const REGENERATE: &str = "cargo run -p ksi-host -- openapi --markdown > docs/api.md";

/// HTTP methods in the order a reader expects them.
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// Renders the OpenAPI document `doc` as Markdown.
///
/// # Errors
/// `doc` lacks `info` or `paths`, or a `$ref` does not point into `#/components/schemas/`.
pub fn markdown(doc: &Value) -> Result<String, String> {
    let info = doc
        .get("info")
        .ok_or("the OpenAPI document has no `info` object")?;
    let paths = doc
        .get("paths")
        .and_then(Value::as_object)
        .ok_or("the OpenAPI document has no `paths` object")?;
    let mut out = String::new();
    let title = info["title"].as_str().unwrap_or("HTTP API");
    let _ = writeln!(out, "# {title}\n");
    let _ = writeln!(
        out,
        "<!-- Generated from host/src/api/openapi.json; do not edit. Regenerate with:\n     {REGENERATE} -->\n"
    );
    if let Some(d) = info["description"].as_str() {
        let _ = writeln!(out, "{d}\n");
    }
    let _ = writeln!(
        out,
        "API version {}, OpenAPI {}. A running daemon serves the document itself at `GET /openapi.json`.\n",
        info["version"].as_str().unwrap_or("?"),
        doc["openapi"].as_str().unwrap_or("?")
    );

    let mut ops = Vec::new();
    let mut sorted: Vec<_> = paths.iter().collect();
    sorted.sort_by_key(|(p, _)| p.as_str());
    for (path, item) in sorted {
        for m in METHODS {
            if let Some(op) = item.get(m) {
                ops.push((m.to_uppercase(), path.as_str(), op));
            }
        }
    }

    out.push_str("## Routes\n\n| method | path | what it does |\n|---|---|---|\n");
    for (m, path, op) in &ops {
        let _ = writeln!(
            out,
            "| {m} | [`{path}`](#{}) | {} |",
            anchor(m, path),
            cell(op["summary"].as_str().unwrap_or(""))
        );
    }

    for (m, path, op) in &ops {
        let _ = writeln!(
            out,
            "\n<a id=\"{}\"></a>\n## `{m} {path}`\n",
            anchor(m, path)
        );
        if let Some(s) = op["summary"].as_str() {
            let _ = writeln!(out, "{s}\n");
        }
        if let Some(params) = op["parameters"].as_array().filter(|p| !p.is_empty()) {
            out.push_str("Parameters:\n\n| name | in | type | required | description |\n|---|---|---|---|---|\n");
            for p in params {
                let _ = writeln!(
                    out,
                    "| `{}` | {} | {} | {} | {} |",
                    p["name"].as_str().unwrap_or("?"),
                    p["in"].as_str().unwrap_or("?"),
                    schema_type(&p["schema"])?,
                    if p["required"] == true { "yes" } else { "no" },
                    cell(p["description"].as_str().unwrap_or(""))
                );
            }
            out.push('\n');
        }
        if let Some(body) = op.get("requestBody") {
            let required = if body["required"] == true {
                "required"
            } else {
                "optional"
            };
            let content = body["content"].as_object().cloned().unwrap_or_default();
            for (media, c) in &content {
                let _ = writeln!(
                    out,
                    "Request body ({required}, `{media}`): {}\n",
                    schema_type(&c["schema"])?
                );
                if c["schema"]["properties"].is_object() {
                    properties(&mut out, &c["schema"])?;
                }
            }
        }
        if let Some(responses) = op["responses"].as_object() {
            out.push_str("Responses:\n\n| status | meaning |\n|---|---|\n");
            let mut codes: Vec<_> = responses.iter().collect();
            codes.sort_by_key(|(code, _)| code.as_str());
            for (code, r) in codes {
                let _ = writeln!(
                    out,
                    "| {code} | {} |",
                    cell(r["description"].as_str().unwrap_or(""))
                );
            }
        }
    }

    let empty = Map::new();
    let schemas = doc["components"]["schemas"].as_object().unwrap_or(&empty);
    if !schemas.is_empty() {
        out.push_str("\n## Schemas\n");
        let mut names: Vec<_> = schemas.keys().collect();
        names.sort();
        for name in names {
            let s = &schemas[name];
            let _ = writeln!(
                out,
                "\n<a id=\"schema-{}\"></a>\n### {name}\n",
                name.to_lowercase()
            );
            if let Some(d) = s["description"].as_str() {
                let _ = writeln!(out, "{d}\n");
            }
            if s["additionalProperties"] == false {
                out.push_str("Unknown fields are refused.\n\n");
            }
            properties(&mut out, s)?;
        }
    }
    Ok(out)
}

/// The table of an object schema's properties.
fn properties(out: &mut String, schema: &Value) -> Result<(), String> {
    let required: Vec<&str> = schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    out.push_str("| field | type | required | description |\n|---|---|---|---|\n");
    // Required fields first, then the others, each group in the document's order.
    let props = schema["properties"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let (req, opt): (Vec<_>, Vec<_>) = props
        .iter()
        .partition(|(k, _)| required.contains(&k.as_str()));
    for (name, p) in req.into_iter().chain(opt) {
        let _ = writeln!(
            out,
            "| `{name}` | {} | {} | {} |",
            schema_type(p)?,
            if required.contains(&name.as_str()) {
                "yes"
            } else {
                "no"
            },
            cell(p["description"].as_str().unwrap_or(""))
        );
    }
    out.push('\n');
    Ok(())
}

/// A schema in a few words: `string`, ``string: one of `a`, `b` ``, `integer (1–1000)`, a link
/// to a named schema, `any JSON` for `{}`.
fn schema_type(s: &Value) -> Result<String, String> {
    if let Some(r) = s["$ref"].as_str() {
        let name = r.strip_prefix("#/components/schemas/").ok_or_else(|| {
            format!("unsupported $ref {r:?}: only #/components/schemas/NAME is rendered")
        })?;
        return Ok(format!("[{name}](#schema-{})", name.to_lowercase()));
    }
    let mut t = match s["type"].as_str() {
        Some("array") => format!("array of {}", schema_type(&s["items"])?),
        Some(t) => t.to_string(),
        None => "any JSON".to_string(),
    };
    if let Some(values) = s["enum"].as_array() {
        let values: Vec<String> = values
            .iter()
            .map(|v| format!("`{}`", v.as_str().map_or(v.to_string(), str::to_string)))
            .collect();
        let _ = write!(t, ": one of {}", values.join(", "));
    }
    match (s.get("minimum"), s.get("maximum")) {
        (Some(lo), Some(hi)) => {
            let _ = write!(t, " ({lo}–{hi})");
        }
        (Some(lo), None) => {
            let _ = write!(t, " (≥ {lo})");
        }
        (None, Some(hi)) => {
            let _ = write!(t, " (≤ {hi})");
        }
        (None, None) => {}
    }
    if let Some(d) = s.get("default") {
        let _ = write!(t, ", default `{d}`");
    }
    Ok(t)
}

/// An HTML anchor for an operation: `get-workflows-id-transcript`.
fn anchor(method: &str, path: &str) -> String {
    let mut a = method.to_lowercase();
    for part in path.split(|c: char| !c.is_ascii_alphanumeric()) {
        if !part.is_empty() {
            a.push('-');
            a.push_str(part);
        }
    }
    a
}

/// Text made safe for a Markdown table cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_route_of_the_bundled_document_gets_a_section() {
        let doc: Value = serde_json::from_str(super::super::OPENAPI).unwrap();
        let md = markdown(&doc).unwrap();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for m in item.as_object().unwrap().keys() {
                let heading = format!("## `{} {path}`", m.to_uppercase());
                assert!(md.contains(&heading), "no section {heading}");
            }
        }
        assert!(md.contains("### Spawn"), "schemas are listed");
    }

    #[test]
    fn schema_types_name_enums_ranges_defaults_and_references() {
        let t = schema_type(&json!({"type": "string", "enum": ["a", "b"]})).unwrap();
        assert_eq!(t, "string: one of `a`, `b`");
        let t = schema_type(&json!({"type": "integer", "minimum": 1, "maximum": 1000})).unwrap();
        assert_eq!(t, "integer (1–1000)");
        let t = schema_type(&json!({"type": "boolean", "default": true})).unwrap();
        assert_eq!(t, "boolean, default `true`");
        let t = schema_type(&json!({"$ref": "#/components/schemas/Spawn"})).unwrap();
        assert_eq!(t, "[Spawn](#schema-spawn)");
        let e = schema_type(&json!({"$ref": "other.json#/x"})).unwrap_err();
        assert!(e.contains("other.json#/x"), "{e}");
    }

    #[test]
    fn a_document_without_paths_is_refused_with_a_reason() {
        let e = markdown(&json!({"info": {"title": "x"}})).unwrap_err();
        assert!(e.contains("`paths`"), "{e}");
    }
}
