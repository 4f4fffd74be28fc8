//! Text helpers for audit fields (the bottom of the crate: it uses nothing of it).

/// `s` cut to at most `max` bytes, at a character boundary (audit fields are bounded).
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}
