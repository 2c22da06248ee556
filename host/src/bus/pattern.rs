//! Topic names and subscription patterns.
//!
//! Topics are dotted (`claude.spawn.request`). In a pattern, `*` matches exactly one segment
//! and `>` (only as the last segment) matches one or more remaining segments:
//! `claude.spawn.*` matches `claude.spawn.request`, `workflow.>` matches `workflow.a.b`.

/// A topic or pattern that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic {0:?} is invalid: {1}. Use dotted names like claude.spawn.request")]
    Topic(String, &'static str),
    #[error(
        "pattern {0:?} is invalid: {1}. Use dotted segments, `*` for one segment, `>` at the end for the rest"
    )]
    Pattern(String, &'static str),
}

const MAX_LEN: usize = 255;

/// Checks a topic: non-empty dotted segments of `[A-Za-z0-9_:-]`, no wildcards.
pub fn validate_topic(topic: &str) -> Result<(), TopicError> {
    let bad = |why| Err(TopicError::Topic(topic.to_string(), why));
    if topic.is_empty() {
        return bad("it is empty");
    }
    if topic.len() > MAX_LEN {
        return bad("it is longer than 255 bytes");
    }
    for seg in topic.split('.') {
        if seg.is_empty() {
            return bad("it has an empty segment");
        }
        if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':'))
        {
            return bad("segments may hold only letters, digits, '_', '-' and ':'");
        }
    }
    Ok(())
}

/// Checks a subscription pattern.
pub fn validate_pattern(pattern: &str) -> Result<(), TopicError> {
    let bad = |why| Err(TopicError::Pattern(pattern.to_string(), why));
    if pattern.is_empty() {
        return bad("it is empty");
    }
    if pattern.len() > MAX_LEN {
        return bad("it is longer than 255 bytes");
    }
    let segs: Vec<&str> = pattern.split('.').collect();
    for (i, seg) in segs.iter().enumerate() {
        match *seg {
            "" => return bad("it has an empty segment"),
            "*" => {}
            ">" if i + 1 == segs.len() => {}
            ">" => return bad("`>` may only be the last segment"),
            s if s.contains(['*', '>']) => return bad("wildcards must be whole segments"),
            s if !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':')) =>
            {
                return bad("segments may hold only letters, digits, '_', '-' and ':'");
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether `topic` matches `pattern` (both assumed valid).
pub fn matches(pattern: &str, topic: &str) -> bool {
    let mut p = pattern.split('.');
    let mut t = topic.split('.');
    loop {
        match (p.next(), t.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(ps), Some(ts)) if ps == ts => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_matching_table() {
        let cases = [
            ("claude.spawn.*", "claude.spawn.request", true),
            ("claude.spawn.*", "claude.spawn", false),
            ("claude.spawn.*", "claude.spawn.request.extra", false),
            ("claude.*.request", "claude.spawn.request", true),
            ("claude.*.request", "claude.spawn.started", false),
            ("workflow.>", "workflow.debate", true),
            ("workflow.>", "workflow.debate.step.opening", true),
            ("workflow.>", "workflow", false),
            ("workflow.>", "workflows.debate", false),
            (">", "anything.at.all", true),
            (">", "x", true),
            ("*", "x", true),
            ("*", "x.y", false),
            ("*.*", "x.y", true),
            ("a.b", "a.b", true),
            ("a.b", "a.bc", false),
            ("a.b", "a", false),
            ("a", "a.b", false),
            ("*.b.>", "a.b.c.d", true),
            ("*.b.>", "a.c.c.d", false),
        ];
        for (pattern, topic, want) in cases {
            validate_pattern(pattern).unwrap();
            validate_topic(topic).unwrap();
            assert_eq!(matches(pattern, topic), want, "{pattern} vs {topic}");
        }
    }

    #[test]
    fn invalid_patterns_and_topics_are_rejected_with_the_reason() {
        for p in ["", "a..b", "a.>.b", "a.b*", ".a", "a b"] {
            assert!(validate_pattern(p).is_err(), "{p:?} should be invalid");
        }
        for t in ["", "a..b", "a.*", "a.>", "a b", "a."] {
            assert!(validate_topic(t).is_err(), "{t:?} should be invalid");
        }
        let e = validate_pattern("a.>.b").unwrap_err().to_string();
        assert!(e.contains("last segment"), "{e}");
    }
}
