//! Parquet files with a `text` column (strings, tokenized) or an `input_ids` column (lists of
//! integers), one document per row, read with the `parquet` crate; the columns of
//! [`fields::CHECKED_FIELDS`] are checked against each row's tokens.

use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;

use crate::fields;
use crate::tokenizer::TextTokenizer;
use crate::{DataError, Result};

/// Every row's document: `input_ids` if the file has that column, else `text` tokenized.
pub fn read(path: &Path, vocab: usize, tokenizer: &TextTokenizer) -> Result<Vec<Vec<u32>>> {
    let bad = |reason: String| DataError::Format {
        path: path.to_path_buf(),
        format: "Parquet",
        reason,
    };
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader = SerializedFileReader::new(file).map_err(|e| bad(e.to_string()))?;
    let schema = reader.metadata().file_metadata().schema_descr();
    let names: Vec<String> = schema
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    let column = if names.iter().any(|n| n == "input_ids") {
        "input_ids"
    } else if names.iter().any(|n| n == "text") {
        "text"
    } else {
        return Err(bad(format!(
            "no `text` or `input_ids` column (columns: {})",
            names.join(", ")
        )));
    };
    let rows = reader.get_row_iter(None).map_err(|e| bad(e.to_string()))?;
    let mut docs = Vec::new();
    for (r, row) in rows.enumerate() {
        let row = row.map_err(|e| bad(format!("row {r}: {e}")))?;
        let field = row
            .get_column_iter()
            .find(|(n, _)| n.as_str() == column)
            .map(|(_, f)| f.clone())
            .ok_or_else(|| bad(format!("row {r} has no `{column}`")))?;
        let line = |reason: String| bad(format!("row {r}: {reason}"));
        let ids = match (column, field) {
            ("text", Field::Str(s)) => tokenizer.encode(&s).map_err(line)?,
            ("input_ids", Field::ListInternal(list)) => {
                let mut ids = Vec::with_capacity(list.len());
                for (k, v) in int_list("input_ids", &list)
                    .map_err(line)?
                    .into_iter()
                    .enumerate()
                {
                    ids.push(
                        u32::try_from(v)
                            .map_err(|_| line(format!("input_ids[{k}] = {v} is not a token id")))?,
                    );
                }
                ids
            }
            (_, Field::Null) => return Err(line(format!("`{column}` is null"))),
            (_, other) => {
                return Err(line(format!(
                    "`{column}` is {other}, not the expected type"
                )))
            }
        };
        if let Some(k) = ids.iter().position(|&i| i as usize >= vocab) {
            return Err(line(format!(
                "token id {} (position {k}) is outside the model's vocabulary of {vocab}",
                ids[k]
            )));
        }
        for (name, field) in row.get_column_iter() {
            if !fields::CHECKED_FIELDS.contains(&name.as_str()) {
                continue;
            }
            let values = match field {
                Field::Null => continue,
                Field::ListInternal(list) => int_list(name, list).map_err(line)?,
                other => return Err(line(format!("`{name}` is {other}, not a list of integers"))),
            };
            fields::check(name, &values, &ids).map_err(line)?;
        }
        docs.push(ids);
    }
    Ok(docs)
}

/// The integers of a list column's value (`name` for the message).
fn int_list(name: &str, list: &parquet::record::List) -> std::result::Result<Vec<i128>, String> {
    list.elements()
        .iter()
        .enumerate()
        .map(|(k, f)| match f {
            Field::Byte(x) => Ok(i128::from(*x)),
            Field::Short(x) => Ok(i128::from(*x)),
            Field::Int(x) => Ok(i128::from(*x)),
            Field::Long(x) => Ok(i128::from(*x)),
            Field::UByte(x) => Ok(i128::from(*x)),
            Field::UShort(x) => Ok(i128::from(*x)),
            Field::UInt(x) => Ok(i128::from(*x)),
            Field::ULong(x) => Ok(i128::from(*x)),
            other => Err(format!("{name}[{k}] = {other} is not an integer")),
        })
        .collect()
}
