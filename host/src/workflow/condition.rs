//! `when` conditions: small boolean expressions over the workflow's `params` and `state`.
//!
//! Grammar: `a || b`, `a && b`, `!a`, comparisons `== != < <= > >=`, parentheses, paths
//! (`state.round`, `params.rounds`, `state.items[0].ok`), and literals (numbers, "strings",
//! true, false, null). A bare path is true unless it is missing, null, false, 0, "" or empty.

use serde_json::Value;

/// A parsed condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    Or(Box<Condition>, Box<Condition>),
    And(Box<Condition>, Box<Condition>),
    Not(Box<Condition>),
    Cmp(Operand, CmpOp, Operand),
    Truthy(Operand),
}

/// One side of a comparison.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    Path(Vec<PathSeg>),
    Lit(Value),
}

/// A path segment.
#[derive(Debug, Clone, PartialEq)]
pub enum PathSeg {
    Key(String),
    Index(usize),
}

/// Comparison operators.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Num(f64),
    Str(String),
    Op(&'static str),
}

fn lex(s: &str) -> Result<Vec<Tok>, String> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let c = b[i] as char;
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' {
            let st = i;
            while i < b.len()
                && ((b[i] as char).is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'-')
            {
                i += 1;
            }
            out.push(Tok::Ident(s[st..i].to_string()));
        } else if c.is_ascii_digit()
            || (c == '-' && i + 1 < b.len() && (b[i + 1] as char).is_ascii_digit())
        {
            let st = i;
            i += 1;
            while i < b.len() && ((b[i] as char).is_ascii_digit() || b[i] == b'.') {
                i += 1;
            }
            out.push(Tok::Num(
                s[st..i]
                    .parse()
                    .map_err(|_| format!("bad number {:?}", &s[st..i]))?,
            ));
        } else if c == '"' || c == '\'' {
            let q = b[i];
            let st = i + 1;
            i += 1;
            while i < b.len() && b[i] != q {
                i += 1;
            }
            if i >= b.len() {
                return Err("unterminated string".into());
            }
            out.push(Tok::Str(s[st..i].to_string()));
            i += 1;
        } else {
            let two = s.get(i..i + 2).unwrap_or("");
            let op = ["==", "!=", "<=", ">=", "&&", "||"]
                .into_iter()
                .find(|o| *o == two);
            if let Some(op) = op {
                out.push(Tok::Op(op));
                i += 2;
            } else {
                let one = ["<", ">", "!", "(", ")", ".", "[", "]"]
                    .into_iter()
                    .find(|o| o.as_bytes()[0] == b[i])
                    .ok_or_else(|| format!("unexpected character {c:?}"))?;
                out.push(Tok::Op(one));
                i += 1;
            }
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek_op(&self, op: &str) -> bool {
        matches!(self.toks.get(self.pos), Some(Tok::Op(o)) if *o == op)
    }
    fn or(&mut self) -> Result<Condition, String> {
        let mut l = self.and()?;
        while self.peek_op("||") {
            self.pos += 1;
            l = Condition::Or(Box::new(l), Box::new(self.and()?));
        }
        Ok(l)
    }
    fn and(&mut self) -> Result<Condition, String> {
        let mut l = self.unary()?;
        while self.peek_op("&&") {
            self.pos += 1;
            l = Condition::And(Box::new(l), Box::new(self.unary()?));
        }
        Ok(l)
    }
    fn unary(&mut self) -> Result<Condition, String> {
        if self.peek_op("!") {
            self.pos += 1;
            return Ok(Condition::Not(Box::new(self.unary()?)));
        }
        if self.peek_op("(") {
            self.pos += 1;
            let inner = self.or()?;
            if !self.peek_op(")") {
                return Err("missing ')'".into());
            }
            self.pos += 1;
            return Ok(inner);
        }
        let left = self.operand()?;
        let op = match self.toks.get(self.pos) {
            Some(Tok::Op("==")) => CmpOp::Eq,
            Some(Tok::Op("!=")) => CmpOp::Ne,
            Some(Tok::Op("<")) => CmpOp::Lt,
            Some(Tok::Op("<=")) => CmpOp::Le,
            Some(Tok::Op(">")) => CmpOp::Gt,
            Some(Tok::Op(">=")) => CmpOp::Ge,
            _ => return Ok(Condition::Truthy(left)),
        };
        self.pos += 1;
        Ok(Condition::Cmp(left, op, self.operand()?))
    }
    fn operand(&mut self) -> Result<Operand, String> {
        match self.toks.get(self.pos).cloned() {
            Some(Tok::Num(n)) => {
                self.pos += 1;
                Ok(Operand::Lit(serde_json::json!(n)))
            }
            Some(Tok::Str(s)) => {
                self.pos += 1;
                Ok(Operand::Lit(Value::String(s)))
            }
            Some(Tok::Ident(id)) => {
                self.pos += 1;
                match id.as_str() {
                    "true" => return Ok(Operand::Lit(Value::Bool(true))),
                    "false" => return Ok(Operand::Lit(Value::Bool(false))),
                    "null" => return Ok(Operand::Lit(Value::Null)),
                    "params" | "state" => {}
                    other => {
                        return Err(format!("paths start with params or state, not {other:?}"));
                    }
                }
                let mut path = vec![PathSeg::Key(id)];
                loop {
                    if self.peek_op(".") {
                        self.pos += 1;
                        match self.toks.get(self.pos) {
                            Some(Tok::Ident(k)) => path.push(PathSeg::Key(k.clone())),
                            _ => return Err("expected a name after '.'".into()),
                        }
                        self.pos += 1;
                    } else if self.peek_op("[") {
                        self.pos += 1;
                        match self.toks.get(self.pos) {
                            Some(Tok::Num(n)) if *n >= 0.0 => {
                                path.push(PathSeg::Index(*n as usize))
                            }
                            _ => return Err("expected an index after '['".into()),
                        }
                        self.pos += 1;
                        if !self.peek_op("]") {
                            return Err("missing ']'".into());
                        }
                        self.pos += 1;
                    } else {
                        return Ok(Operand::Path(path));
                    }
                }
            }
            other => Err(format!("expected a value or a path, found {other:?}")),
        }
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

impl Condition {
    /// Parses a condition.
    ///
    /// # Errors
    /// A message saying what was unexpected.
    pub fn parse(src: &str) -> Result<Condition, String> {
        let mut p = Parser {
            toks: lex(src)?,
            pos: 0,
        };
        if p.toks.is_empty() {
            return Err("the condition is empty".into());
        }
        let c = p.or()?;
        if p.pos != p.toks.len() {
            return Err(format!("unexpected {:?}", p.toks[p.pos]));
        }
        Ok(c)
    }

    /// Evaluates against `{"params": ..., "state": ...}`.
    pub fn eval(&self, ctx: &Value) -> bool {
        match self {
            Condition::Or(a, b) => a.eval(ctx) || b.eval(ctx),
            Condition::And(a, b) => a.eval(ctx) && b.eval(ctx),
            Condition::Not(a) => !a.eval(ctx),
            Condition::Truthy(o) => truthy(&o.value(ctx)),
            Condition::Cmp(a, op, b) => {
                let (a, b) = (a.value(ctx), b.value(ctx));
                match op {
                    CmpOp::Eq => json_eq(&a, &b),
                    CmpOp::Ne => !json_eq(&a, &b),
                    _ => match (a.as_f64(), b.as_f64(), a.as_str(), b.as_str()) {
                        (Some(x), Some(y), _, _) => cmp(x.partial_cmp(&y), *op),
                        (_, _, Some(x), Some(y)) => cmp(Some(x.cmp(y)), *op),
                        _ => false,
                    },
                }
            }
        }
    }
}

fn json_eq(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

fn cmp(o: Option<std::cmp::Ordering>, op: CmpOp) -> bool {
    use std::cmp::Ordering::*;
    matches!(
        (o, op),
        (Some(Less), CmpOp::Lt | CmpOp::Le)
            | (Some(Equal), CmpOp::Le | CmpOp::Ge)
            | (Some(Greater), CmpOp::Gt | CmpOp::Ge)
    )
}

impl Operand {
    fn value(&self, ctx: &Value) -> Value {
        match self {
            Operand::Lit(v) => v.clone(),
            Operand::Path(p) => {
                let mut cur = ctx;
                for seg in p {
                    let next = match seg {
                        PathSeg::Key(k) => cur.get(k),
                        PathSeg::Index(i) => cur.get(*i),
                    };
                    match next {
                        Some(v) => cur = v,
                        None => return Value::Null,
                    }
                }
                cur.clone()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn conditions_evaluate_over_params_and_state() {
        let ctx = json!({"params": {"rounds": 2, "tone": "calm"}, "state": {"round": 1, "ok": true, "items": [{"v": 3}], "empty": ""}});
        let cases = [
            ("state.round < params.rounds", true),
            ("state.round >= params.rounds", false),
            ("params.tone == 'calm'", true),
            ("params.tone != \"calm\"", false),
            ("state.ok", true),
            ("!state.ok", false),
            ("state.missing", false),
            ("state.empty", false),
            ("state.items[0].v == 3", true),
            ("state.ok && state.round == 1", true),
            (
                "state.missing || (params.rounds > 1 && !state.missing)",
                true,
            ),
            ("state.missing == null", true),
        ];
        for (src, want) in cases {
            let c = Condition::parse(src).unwrap_or_else(|e| panic!("{src}: {e}"));
            assert_eq!(c.eval(&ctx), want, "{src}");
        }
    }

    #[test]
    fn malformed_conditions_say_what_is_wrong() {
        for bad in [
            "",
            "state.round <",
            "foo.bar",
            "(state.ok",
            "state.x $ 1",
            "'open",
        ] {
            assert!(Condition::parse(bad).is_err(), "{bad:?}");
        }
    }
}
