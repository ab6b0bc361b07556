//! GBNF, llama.cpp's grammar format (what vLLM's clients send as `guided_grammar`, xgrammar's
//! EBNF being the same notation), rewritten in the Lark syntax llguidance reads.
//!
//! Both describe a grammar by rules of alternatives, sequences, strings, character classes and
//! repetition, so the rewrite is one rule for one: `root ::= ...` becomes `start: ...`, a
//! character class a one-character regex, a string a JSON string literal, and every other rule
//! name `r_` + its name in lower case (Lark reads a name's case: upper case names terminals).
//! Each rule is written on one line, so GBNF's freedom to break lines anywhere inside a rule
//! cannot meet Lark's line rules.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

/// Whether `src` is GBNF rather than Lark: some line defines a rule with `::=`.
pub fn looks_like_gbnf(src: &str) -> bool {
    src.lines().any(|l| l.split('#').next().unwrap_or("").contains("::="))
}

/// `src` (GBNF) as the same grammar in llguidance's Lark syntax, or what is wrong with it (with
/// its line).
pub fn gbnf_to_lark(src: &str) -> Result<String, String> {
    let mut p = Parser { s: src.chars().collect(), i: 0, depth: 0 };
    let mut rules: Vec<(String, Vec<Seq>, usize)> = Vec::new();
    p.space();
    while !p.done() {
        let line = p.line();
        let name = p.name().ok_or_else(|| p.error("a rule name"))?;
        p.inline_space();
        if !p.eat_str("::=") {
            return Err(p.error(&format!("`::=` after the rule name `{name}`")));
        }
        let body = p.alternatives(false)?;
        if rules.iter().any(|r| r.0 == name) {
            return Err(format!("line {line}: rule `{name}` is defined twice"));
        }
        rules.push((name, body, line));
        p.space();
    }
    if !rules.iter().any(|r| r.0 == "root") {
        return Err("the grammar has no `root` rule (where a GBNF match starts)".into());
    }
    // Names in Lark: `start` for root, `r_<lower case>` for the rest, kept apart where two
    // differed only in case.
    let mut names: HashMap<&str, String> = HashMap::new();
    let mut taken: BTreeMap<String, ()> = BTreeMap::new();
    for (name, _, _) in &rules {
        let mut lark = if name == "root" { "start".to_string() } else { format!("r_{}", name.to_ascii_lowercase()) };
        let base = lark.clone();
        let mut k = 2;
        while taken.contains_key(&lark) {
            lark = format!("{base}-{k}");
            k += 1;
        }
        taken.insert(lark.clone(), ());
        names.insert(name, lark);
    }
    let mut out = String::new();
    for (name, body, line) in &rules {
        let mut text = String::new();
        write_alternatives(&mut text, body, &names).map_err(|r| format!("line {line}: rule `{name}` uses `{r}`, which is never defined"))?;
        let _ = writeln!(out, "{}: {text}", names[name.as_str()]);
    }
    Ok(out)
}

/// A sequence of items; an empty one matches the empty string.
type Seq = Vec<Item>;

struct Item {
    atom: Atom,
    /// At least `.0`, at most `.1` (None: no limit) repetitions; None: exactly once.
    repeat: Option<(u32, Option<u32>)>,
}

enum Atom {
    Literal(String),
    /// Characters in (or with `negated`, not in) these inclusive ranges.
    Class { negated: bool, ranges: Vec<(char, char)> },
    /// `.`: any character.
    Any,
    Rule(String),
    Group(Vec<Seq>),
}

/// Groups nested deeper are refused, as llguidance refuses Lark nested past 30 levels (and the
/// parser recurses once a level).
const MAX_NESTING: usize = 30;

struct Parser {
    s: Vec<char>,
    i: usize,
    /// Groups open around the position.
    depth: usize,
}

impl Parser {
    fn done(&self) -> bool {
        self.i >= self.s.len()
    }

    fn peek(&self) -> Option<char> {
        self.s.get(self.i).copied()
    }

    fn line(&self) -> usize {
        1 + self.s[..self.i.min(self.s.len())].iter().filter(|&&c| c == '\n').count()
    }

    fn error(&self, wanted: &str) -> String {
        match self.peek() {
            Some(c) => format!("line {}: expected {wanted}, found {c:?}", self.line()),
            None => format!("line {}: expected {wanted}, found the end of the grammar", self.line()),
        }
    }

    fn eat_str(&mut self, t: &str) -> bool {
        let t: Vec<char> = t.chars().collect();
        if self.s[self.i..].starts_with(&t) {
            self.i += t.len();
            true
        } else {
            false
        }
    }

    /// Spaces, tabs, line breaks and `#` comments.
    fn space(&mut self) {
        while let Some(c) = self.peek() {
            if c == '#' {
                while self.peek().is_some_and(|c| c != '\n') {
                    self.i += 1;
                }
            } else if c.is_whitespace() {
                self.i += 1;
            } else {
                break;
            }
        }
    }

    /// Spaces and tabs only.
    fn inline_space(&mut self) {
        while self.peek().is_some_and(|c| c == ' ' || c == '\t') {
            self.i += 1;
        }
    }

    fn name(&mut self) -> Option<String> {
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            self.i += 1;
        }
        (self.i > start).then(|| self.s[start..self.i].iter().collect())
    }

    /// Whether a new rule (`name ::=` on one line) starts here: the end of the rule before it.
    fn at_rule_start(&mut self) -> bool {
        let at = self.i;
        let found = self.name().is_some() && {
            self.inline_space();
            self.eat_str("::=")
        };
        self.i = at;
        found
    }

    /// Alternatives up to the end of the rule, or (`nested`) up to the `)` closing a group.
    fn alternatives(&mut self, nested: bool) -> Result<Vec<Seq>, String> {
        let mut alts = vec![self.sequence()?];
        loop {
            self.space();
            match self.peek() {
                Some('|') => {
                    self.i += 1;
                    alts.push(self.sequence()?);
                }
                Some(')') if nested => return Ok(alts),
                Some(')') => return Err(format!("line {}: a `)` without its `(`", self.line())),
                // The end of the grammar, or the next rule, before the `)`.
                _ if nested => return Err(format!("line {}: a `(` is never closed", self.line())),
                _ => return Ok(alts),
            }
        }
    }

    fn sequence(&mut self) -> Result<Seq, String> {
        let mut seq = Vec::new();
        loop {
            self.space();
            let atom = match self.peek() {
                None | Some('|') | Some(')') => return Ok(seq),
                Some(_) if self.at_rule_start() => return Ok(seq),
                Some('"') => {
                    self.i += 1;
                    let mut lit = String::new();
                    loop {
                        match self.peek() {
                            None => return Err(format!("line {}: a string is never closed", self.line())),
                            Some('"') => break,
                            Some(_) => lit.push(self.char_in("a string")?),
                        }
                    }
                    self.i += 1;
                    Atom::Literal(lit)
                }
                Some('[') => self.class()?,
                Some('.') => {
                    self.i += 1;
                    Atom::Any
                }
                Some('(') => {
                    if self.depth >= MAX_NESTING {
                        return Err(format!("line {}: groups nested more than {MAX_NESTING} deep", self.line()));
                    }
                    self.i += 1;
                    self.depth += 1;
                    let alts = self.alternatives(true)?;
                    self.depth -= 1;
                    self.i += 1; // the `)`
                    Atom::Group(alts)
                }
                Some(c) if c.is_ascii_alphanumeric() || c == '-' || c == '_' => Atom::Rule(self.name().unwrap_or_default()),
                Some(_) => return Err(self.error("a string, a character class, a rule name, `(` or `.`")),
            };
            let repeat = self.repeat()?;
            seq.push(Item { atom, repeat });
        }
    }

    fn class(&mut self) -> Result<Atom, String> {
        self.i += 1; // the `[`
        let negated = self.peek() == Some('^');
        if negated {
            self.i += 1;
        }
        let mut ranges = Vec::new();
        loop {
            match self.peek() {
                None => return Err(format!("line {}: a character class is never closed", self.line())),
                Some(']') => break,
                Some(_) => {
                    let lo = self.char_in("a character class")?;
                    let hi = if self.peek() == Some('-') && self.s.get(self.i + 1).is_some_and(|&c| c != ']') {
                        self.i += 1;
                        self.char_in("a character class")?
                    } else {
                        lo
                    };
                    if hi < lo {
                        return Err(format!("line {}: the range {lo:?}-{hi:?} runs backwards", self.line()));
                    }
                    ranges.push((lo, hi));
                }
            }
        }
        self.i += 1; // the `]`
        if ranges.is_empty() {
            return Err(format!("line {}: an empty character class matches nothing", self.line()));
        }
        Ok(Atom::Class { negated, ranges })
    }

    /// One character of a string or class, its escape read (`\n \r \t \\ \" \[ \] \- \^ \/ \'`,
    /// `\xHH`, `\uHHHH`, `\UHHHHHHHH`, as llama.cpp reads them).
    fn char_in(&mut self, what: &str) -> Result<char, String> {
        let c = self.peek().ok_or_else(|| format!("line {}: {what} is never closed", self.line()))?;
        self.i += 1;
        if c != '\\' {
            return Ok(c);
        }
        let e = self.peek().ok_or_else(|| format!("line {}: {what} ends in a lone `\\`", self.line()))?;
        self.i += 1;
        let hex = |p: &mut Parser, n: usize| -> Result<char, String> {
            let digits: String = p.s.get(p.i..p.i + n).map(|d| d.iter().collect()).unwrap_or_default();
            let code = u32::from_str_radix(&digits, 16).ok().filter(|_| digits.len() == n);
            let ch = code.and_then(char::from_u32).ok_or_else(|| format!("line {}: `\\{e}` needs {n} hex digits of a character", p.line()))?;
            p.i += n;
            Ok(ch)
        };
        match e {
            'n' => Ok('\n'),
            'r' => Ok('\r'),
            't' => Ok('\t'),
            '\\' | '"' | '[' | ']' | '-' | '^' | '/' | '\'' => Ok(e),
            'x' => hex(self, 2),
            'u' => hex(self, 4),
            'U' => hex(self, 8),
            _ => Err(format!("line {}: unknown escape `\\{e}` in {what}", self.line())),
        }
    }

    fn repeat(&mut self) -> Result<Option<(u32, Option<u32>)>, String> {
        let r = match self.peek() {
            Some('*') => (0, None),
            Some('+') => (1, None),
            Some('?') => (0, Some(1)),
            Some('{') => {
                let start_line = self.line();
                let close = self.s[self.i..].iter().position(|&c| c == '}').ok_or_else(|| format!("line {start_line}: a `{{` repetition is never closed"))?;
                let inner: String = self.s[self.i + 1..self.i + close].iter().filter(|c| !c.is_whitespace()).collect();
                let bad = || format!("line {start_line}: `{{{inner}}}` is not a repetition (`{{m}}`, `{{m,}}`, `{{m,n}}` or `{{,n}}`)");
                let num = |t: &str| t.parse::<u32>().map_err(|_| bad());
                let r = match inner.split_once(',') {
                    None => {
                        let m = num(&inner)?;
                        (m, Some(m))
                    }
                    Some((m, n)) => {
                        let m = if m.is_empty() { 0 } else { num(m)? };
                        let n = if n.is_empty() { None } else { Some(num(n)?) };
                        if n.is_some_and(|n| n < m) {
                            return Err(bad());
                        }
                        (m, n)
                    }
                };
                self.i += close;
                r
            }
            _ => return Ok(None),
        };
        self.i += 1;
        Ok(Some(r))
    }
}

/// Writes `alts` as Lark; Err: a rule name that no rule defines.
fn write_alternatives(out: &mut String, alts: &[Seq], names: &HashMap<&str, String>) -> Result<(), String> {
    for (k, seq) in alts.iter().enumerate() {
        if k > 0 {
            out.push_str(" | ");
        }
        if seq.is_empty() {
            out.push_str("\"\"");
        }
        for (j, item) in seq.iter().enumerate() {
            if j > 0 {
                out.push(' ');
            }
            match &item.atom {
                Atom::Literal(s) => out.push_str(&serde_json::Value::String(s.clone()).to_string()),
                Atom::Class { negated, ranges } => {
                    out.push_str(if *negated { "/[^" } else { "/[" });
                    for &(lo, hi) in ranges {
                        let _ = write!(out, "\\x{{{:x}}}", lo as u32);
                        if hi != lo {
                            let _ = write!(out, "-\\x{{{:x}}}", hi as u32);
                        }
                    }
                    out.push_str("]/");
                }
                Atom::Any => out.push_str("/(?s:.)/"),
                Atom::Rule(r) => out.push_str(names.get(r.as_str()).ok_or_else(|| r.clone())?),
                Atom::Group(inner) => {
                    out.push('(');
                    write_alternatives(out, inner, names)?;
                    out.push(')');
                }
            }
            match item.repeat {
                None => {}
                Some((0, None)) => out.push('*'),
                Some((1, None)) => out.push('+'),
                Some((0, Some(1))) => out.push('?'),
                Some((m, None)) => {
                    let _ = write!(out, "{{{m},}}");
                }
                Some((m, Some(n))) if m == n => {
                    let _ = write!(out, "{{{m}}}");
                }
                Some((m, Some(n))) => {
                    let _ = write!(out, "{{{m},{n}}}");
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_become_lark_rules_one_line_each() {
        let g = r#"
# a comment
root ::= greeting ws name   # trailing comment
greeting ::= "hello" | "hi"
name ::= [A-Z] [a-z]{1,8}
ws ::= [ \t]+
"#;
        assert!(looks_like_gbnf(g));
        let lark = gbnf_to_lark(g).unwrap();
        assert_eq!(
            lark,
            "start: r_greeting r_ws r_name\n\
             r_greeting: \"hello\" | \"hi\"\n\
             r_name: /[\\x{41}-\\x{5a}]/ /[\\x{61}-\\x{7a}]/{1,8}\n\
             r_ws: /[\\x{20}\\x{9}]/+\n"
        );
    }

    #[test]
    fn rules_may_span_lines_and_groups_nest() {
        let g = "root ::= (\n  \"a\" |\n  \"b\" (\"c\" | [^\\n\"])*\n)\n  item?\nitem ::= . | \"x\"{2,}  item2{,3}\nitem2 ::= \"\"\n";
        let lark = gbnf_to_lark(g).unwrap();
        assert_eq!(lark, "start: (\"a\" | \"b\" (\"c\" | /[^\\x{a}\\x{22}]/)*) r_item?\nr_item: /(?s:.)/ | \"x\"{2,} r_item2{0,3}\nr_item2: \"\"\n");
    }

    #[test]
    fn escapes_become_json_strings_and_class_code_points() {
        let g = r#"root ::= "say \"hi\"\n\t\\" [\x41\u00e9\U0001F600\]\-] "\u00e9" | ws
ws ::= | " " ws"#;
        let lark = gbnf_to_lark(g).unwrap();
        assert_eq!(lark, "start: \"say \\\"hi\\\"\\n\\t\\\\\" /[\\x{41}\\x{e9}\\x{1f600}\\x{5d}\\x{2d}]/ \"é\" | r_ws\nr_ws: \"\" | \" \" r_ws\n");
    }

    /// vLLM's documentation's `guided_grammar` example, indented as it is there.
    #[test]
    fn vllms_sql_example_converts() {
        let g = "
    root ::= select_statement
    select_statement ::= \"SELECT \" column \" from \" table \" where \" condition
    column ::= \"col_1 \" | \"col_2 \"
    table ::= \"table_1 \" | \"table_2 \"
    condition ::= column \"= \" number
    number ::= \"1 \" | \"2 \"
";
        assert_eq!(
            gbnf_to_lark(g).unwrap(),
            "start: r_select_statement\n\
             r_select_statement: \"SELECT \" r_column \" from \" r_table \" where \" r_condition\n\
             r_column: \"col_1 \" | \"col_2 \"\n\
             r_table: \"table_1 \" | \"table_2 \"\n\
             r_condition: r_column \"= \" r_number\n\
             r_number: \"1 \" | \"2 \"\n"
        );
    }

    #[test]
    fn names_keep_apart_where_only_their_case_differs() {
        let lark = gbnf_to_lark("root ::= Value value\nValue ::= \"A\"\nvalue ::= \"a\"\n").unwrap();
        assert_eq!(lark, "start: r_value r_value-2\nr_value: \"A\"\nr_value-2: \"a\"\n");
    }

    #[test]
    fn mistakes_are_named_with_their_line() {
        let cases = [
            ("word ::= \"a\"\n", "no `root` rule"),
            ("root ::= missing\n", "`missing`, which is never defined"),
            ("root ::= \"a\"\nroot ::= \"b\"\n", "line 2: rule `root` is defined twice"),
            ("root ::= \"a\n", "never closed"),
            ("root ::= [ab", "never closed"),
            ("root ::= [z-a]\n", "runs backwards"),
            ("root ::= []\n", "empty character class"),
            ("root ::= (\"a\"\n", "`(` is never closed"),
            ("root ::= (\"a\" | b\nb ::= \"b\"\n", "line 2: a `(` is never closed"),
            ("root ::= \"a\")\n", "without its `(`"),
            ("root ::= \"a\"{3,1}\n", "not a repetition"),
            ("root ::= \"a\"{x}\n", "not a repetition"),
            ("root ::= \"\\q\"\n", "unknown escape `\\q`"),
            ("root ::= \"\\x4\"\n", "2 hex digits"),
            ("root ::= \"\\uD800\"\n", "4 hex digits"),
            ("root \"a\"\n", "`::=` after the rule name `root`"),
            ("root ::= \"a\"\n\n  ::= \"b\"\n", "line 3: expected a string"),
            ("root ::= \"a\" @\n", "line 1: expected a string, a character class"),
        ];
        let deep = format!("root ::= {}\"a\"{}", "(".repeat(100_000), ")".repeat(100_000));
        assert!(gbnf_to_lark(&deep).unwrap_err().contains("nested more than 30 deep"));
        let ok = format!("root ::= {}\"a\"{}", "(".repeat(30), ")".repeat(30));
        assert!(gbnf_to_lark(&ok).is_ok());
        for (g, want) in cases {
            let e = gbnf_to_lark(g).err().unwrap_or_else(|| panic!("{g:?} converted"));
            assert!(e.contains(want), "{g:?}: {e}");
        }
    }

    /// Random text over GBNF's characters: an error or a grammar, never a panic (guided.rs's
    /// tests compile such grammars too).
    #[test]
    fn random_text_converts_or_errs_without_panicking() {
        use rand::{Rng, SeedableRng};
        let alphabet: Vec<char> = "root ::= ab|()[]^-\"\\{},*+?.#\n xé0123".chars().collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut converted = 0;
        for i in 0..20_000 {
            let len = rng.random_range(0..40);
            let mut g: String = if i % 2 == 0 { "root ::= ".into() } else { String::new() };
            g.extend((0..len).map(|_| alphabet[rng.random_range(0..alphabet.len())]));
            if let Ok(lark) = gbnf_to_lark(&g) {
                converted += 1;
                assert!(lark.starts_with("start: ") || lark.contains("\nstart: "), "{g:?} -> {lark:?}");
            }
        }
        assert!(converted > 100, "only {converted} random grammars converted");
    }

    #[test]
    fn lark_is_told_apart_from_gbnf() {
        assert!(!looks_like_gbnf("start: \"a\" | b\nb: /[0-9]+/ # ::= in a comment"));
        assert!(looks_like_gbnf("root::=\"a\""));
    }
}
