//! The header ranks exchange before any data moves: the operation, the dtype, the
//! shape and per-operation words, as `u64` words (see the parent module on agreement).

use crate::{DType, Error, Result};

/// The operations, numbered for the header ranks exchange.
const OPS: [&str; 7] = [
    "send",
    "recv",
    "send_recv",
    "all_to_all",
    "all_reduce",
    "all_gather",
    "barrier",
];
/// Dimensions a header carries.
const MAX_DIMS: usize = 8;
/// Header words: operation, dtype, refused, rank of the shape, the dimensions.
pub(super) const HEADER: usize = 4 + MAX_DIMS;

/// What a rank says about its side of a call.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Header {
    pub(super) op: &'static str,
    pub(super) dtype: DType,
    pub(super) shape: Vec<usize>,
    /// Per-operation words (`all_to_all`: the rows this rank sends to each rank).
    pub(super) extra: Vec<u64>,
    /// This rank refused its own arguments: it takes part in the header exchange only,
    /// so its peers fail at once instead of waiting inside NCCL for its data.
    pub(super) refused: bool,
}

impl Header {
    pub(super) fn encode(&self) -> Result<Vec<u64>> {
        if self.shape.len() > MAX_DIMS {
            return Err(Error::Shape {
                tensor: format!("{} input", self.op),
                expected: format!("rank <= {MAX_DIMS}"),
                found: crate::shape_str(&self.shape),
            });
        }
        let code = |op| OPS.iter().position(|o| *o == op).unwrap_or(OPS.len()) as u64;
        let mut w = vec![0u64; HEADER];
        w[0] = code(self.op);
        w[1] = DType::ALL
            .iter()
            .position(|d| *d == self.dtype)
            .unwrap_or(0) as u64;
        w[2] = u64::from(self.refused);
        w[3] = self.shape.len() as u64;
        for (i, d) in self.shape.iter().enumerate() {
            w[4 + i] = *d as u64;
        }
        w.extend_from_slice(&self.extra);
        Ok(w)
    }

    pub(super) fn decode(w: &[u64]) -> Option<Header> {
        let op = *OPS.get(usize::try_from(w[0]).ok()?)?;
        let dtype = *DType::ALL.get(usize::try_from(w[1]).ok()?)?;
        let refused = match w[2] {
            0 => false,
            1 => true,
            _ => return None,
        };
        let dims = usize::try_from(w[3]).ok().filter(|&n| n <= MAX_DIMS)?;
        Some(Header {
            op,
            dtype,
            shape: w[4..4 + dims].iter().map(|&d| d as usize).collect(),
            extra: w[HEADER..].to_vec(),
            refused,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_refuse_what_they_cannot_carry() {
        let h = Header {
            op: "all_to_all",
            dtype: DType::BF16,
            shape: vec![5, 3, 2],
            extra: vec![1, 0, 4],
            refused: false,
        };
        let w = h.encode().expect("encode");
        assert_eq!(w.len(), HEADER + 3);
        assert_eq!(Header::decode(&w), Some(h.clone()));
        let refusal = Header { refused: true, ..h };
        assert_eq!(
            Header::decode(&refusal.encode().expect("encode")),
            Some(refusal)
        );
        let deep = Header {
            op: "send",
            dtype: DType::F32,
            shape: vec![1; MAX_DIMS + 1],
            extra: vec![],
            refused: false,
        };
        assert!(deep
            .encode()
            .expect_err("rank 9")
            .to_string()
            .contains("rank <= 8"));
        let mut bad = Header {
            op: "send",
            dtype: DType::F32,
            shape: vec![2],
            extra: vec![],
            refused: false,
        }
        .encode()
        .expect("encode");
        bad[0] = 99;
        assert_eq!(Header::decode(&bad), None);
    }
}
