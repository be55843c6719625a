//! [`Block`]: the part of a weight a fused optimizer step updates (all of it, rows, or
//! columns: S²FT's submatrices).

use kiln_runtime::{Error, Result};

/// The part of a row-major weight `[out, in]` a step updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    /// `W[start:end, :]` (`Rows { start: 0, end: out }`: the whole weight).
    Rows {
        /// First row.
        start: usize,
        /// One past the last row.
        end: usize,
    },
    /// `W[:, start:end]`.
    Columns {
        /// First column.
        start: usize,
        /// One past the last column.
        end: usize,
    },
}

impl Block {
    /// All of a weight with `rows` rows.
    pub fn whole(rows: usize) -> Block {
        Block::Rows {
            start: 0,
            end: rows,
        }
    }

    /// A block from `kiln run`'s `block` (`rows` | `columns`), `start` and `end`.
    pub fn parse(kind: &str, start: usize, end: usize) -> Result<Block> {
        match kind {
            "rows" => Ok(Block::Rows { start, end }),
            "columns" => Ok(Block::Columns { start, end }),
            _ => Err(Error::Param {
                param: "block".into(),
                expected: "rows | columns".into(),
                found: kind.into(),
            }),
        }
    }

    /// `(start, end)`.
    pub fn range(&self) -> (usize, usize) {
        match *self {
            Block::Rows { start, end } | Block::Columns { start, end } => (start, end),
        }
    }

    /// The block's shape inside a weight of shape `[out, in]`.
    pub fn shape(&self, out: usize, inp: usize) -> [usize; 2] {
        let (s, e) = self.range();
        match self {
            Block::Rows { .. } => [e - s, inp],
            Block::Columns { .. } => [out, e - s],
        }
    }

    /// Checks the block against `w`'s shape `[out, in]` (`start <= end <=` the extent);
    /// errors name `start..end` and the weight `name`.
    pub fn check(&self, name: &str, out: usize, inp: usize) -> Result<()> {
        let (s, e) = self.range();
        let (extent, what) = match self {
            Block::Rows { .. } => (out, "rows"),
            Block::Columns { .. } => (inp, "columns"),
        };
        if s > e || e > extent {
            return Err(Error::Param {
                param: "start..end".into(),
                expected: format!("start <= end <= {extent} ({name}'s {what})"),
                found: format!("{s}..{e}"),
            });
        }
        Ok(())
    }
}
