//! The fields a record may carry beside its tokens that would change what trains — `labels`,
//! `attention_mask`, `loss_mask`, `position_ids`, as Hugging Face `datasets` pipelines and
//! Megatron-style exports write them. hotspa trains every next token of a sequence, attending
//! within the sequence, at positions from 0; a field that says exactly that is accepted (a
//! tokenized dataset's `attention_mask` of ones, `labels` copied from `input_ids`), anything
//! else is refused by name, never ignored: a prompt masked with -100 or padding would otherwise
//! train silently on tokens the file said to leave out.
//!
//! ```text
//! {"input_ids": [1, 5, 9], "attention_mask": [1, 1, 1], "labels": [1, 5, 9]}   accepted
//! {"input_ids": [1, 5, 9], "labels": [-100, 5, 9]}                             refused
//! {"input_ids": [1, 5, 0], "attention_mask": [1, 1, 0]}                        refused
//! ```

/// The fields checked, in the order they are checked.
pub const CHECKED_FIELDS: [&str; 4] = ["labels", "attention_mask", "loss_mask", "position_ids"];

/// Whether field `name` with `values` says what hotspa does with the sequence `ids` anyway;
/// the reason (naming the field, the position and what to do) when it does not.
pub fn check(name: &str, values: &[i128], ids: &[u32]) -> Result<(), String> {
    if values.len() != ids.len() {
        return Err(format!(
            "`{name}` has {} values but the sequence has {} tokens",
            values.len(),
            ids.len()
        ));
    }
    let first_off = |want: &dyn Fn(usize) -> i128| (0..ids.len()).find(|&k| values[k] != want(k));
    match name {
        "labels" => match first_off(&|k| i128::from(ids[k])) {
            None => Ok(()),
            Some(k) => {
                let why = if values[k] < 0 {
                    format!(
                        " ({}: a token left out of the loss, e.g. a masked prompt)",
                        values[k]
                    )
                } else {
                    String::new()
                };
                Err(format!(
                    "`labels[{k}]` = {} differs from the token there ({}){why}: hotspa trains \
                     every next token of a sequence and has no per-token loss mask or other \
                     targets; drop `labels` (or make it equal to the tokens) to train on every \
                     token",
                    values[k], ids[k]
                ))
            }
        },
        "attention_mask" | "loss_mask" => match first_off(&|_| 1) {
            None => Ok(()),
            Some(k) => Err(format!(
                "`{name}[{k}]` = {}{}: hotspa packs sequences without padding and trains every \
                 token of each; remove the masked tokens (and the field) from the data",
                values[k],
                if values[k] == 0 { " (padding)" } else { "" }
            )),
        },
        "position_ids" => match first_off(&|k| k as i128) {
            None => Ok(()),
            Some(k) => Err(format!(
                "`position_ids[{k}]` = {}: hotspa numbers every sequence's positions 0, 1, 2, …; \
                 drop the field (or split packed documents into records of their own)",
                values[k]
            )),
        },
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_that_say_what_hotspa_does_pass_and_the_rest_are_refused_by_name() {
        let ids = [1u32, 5, 9];
        assert!(check("labels", &[1, 5, 9], &ids).is_ok());
        assert!(check("attention_mask", &[1, 1, 1], &ids).is_ok());
        assert!(check("loss_mask", &[1, 1, 1], &ids).is_ok());
        assert!(check("position_ids", &[0, 1, 2], &ids).is_ok());
        let e = check("labels", &[-100, 5, 9], &ids).unwrap_err();
        assert!(
            e.contains("`labels[0]` = -100") && e.contains("masked prompt"),
            "{e}"
        );
        let e = check("labels", &[1, 5, 7], &ids).unwrap_err();
        assert!(
            e.contains("`labels[2]` = 7 differs from the token there (9)"),
            "{e}"
        );
        let e = check("attention_mask", &[1, 1, 0], &ids).unwrap_err();
        assert!(e.contains("`attention_mask[2]` = 0 (padding)"), "{e}");
        let e = check("loss_mask", &[0, 1, 1], &ids).unwrap_err();
        assert!(e.contains("`loss_mask[0]` = 0"), "{e}");
        let e = check("position_ids", &[0, 1, 0], &ids).unwrap_err();
        assert!(e.contains("`position_ids[2]` = 0"), "{e}");
        let e = check("attention_mask", &[1, 1], &ids).unwrap_err();
        assert!(e.contains("2 values but the sequence has 3 tokens"), "{e}");
    }
}
