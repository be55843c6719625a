//! The collectives of [`NcclComm`]: each agrees on the call with its peers, then moves
//! the bytes on the communicator's stream (see the parent module on ordering).

use super::*;

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn client(&self) -> &Client {
        &self.client
    }

    fn send(&self, t: &Tensor, peer: usize) -> Result<()> {
        self.handshake("send", peer, t.dtype(), t.shape())?;
        let (ptr, _keep) = self.addresses("send", &[t])?;
        let bytes = t.numel() * t.dtype().size();
        self.move_bytes("send", Some(peer), &[(ptr[0], bytes, peer)], &[])
    }

    fn recv(&self, peer: usize, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        self.handshake("recv", peer, dtype, shape)?;
        let out = Tensor::empty(&self.client, dtype, shape)?;
        let (ptr, _keep) = self.addresses("recv", &[&out])?;
        let bytes = out.numel() * dtype.size();
        self.move_bytes("recv", Some(peer), &[], &[(ptr[0], bytes, peer)])?;
        Ok(out)
    }

    fn send_recv(&self, t: &Tensor, to: usize, from: usize) -> Result<Tensor> {
        let op = "send_recv";
        self.check_peer(op, to)?;
        self.check_peer(op, from)?;
        let mine = Header {
            op,
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            extra: vec![],
            refused: false,
        }
        .encode()?;
        let got = self
            .swap_words(op, Some((&mine, to)), Some((from, HEADER)))?
            .unwrap_or_default();
        let got = Header::decode(&got)
            .filter(|h| h.op == op)
            .ok_or_else(|| self.err(op, Some(from), "the peer is not in `send_recv`"))?;
        // The verdict goes back to the sender, so a mismatch fails both sides.
        let verdict = [u64::from(got.dtype != t.dtype())];
        let theirs = self
            .swap_words(op, Some((&verdict, from)), Some((to, 1)))?
            .unwrap_or_default();
        if got.dtype != t.dtype() {
            return Err(self.err(
                op,
                Some(from),
                format!("received {}, sending {}", got.dtype, t.dtype()),
            ));
        }
        if theirs.first() != Some(&0) {
            return Err(self.err(op, Some(to), "the receiver refused the dtype sent"));
        }
        let out = Tensor::empty(&self.client, t.dtype(), &got.shape)?;
        let (ptrs, _keep) = self.addresses(op, &[t, &out])?;
        let size = t.dtype().size();
        self.move_bytes(
            op,
            Some(from),
            &[(ptrs[0], t.numel() * size, to)],
            &[(ptrs[1], out.numel() * size, from)],
        )?;
        Ok(out)
    }

    fn all_to_all(&self, t: &Tensor, send_rows: &[usize]) -> Result<(Tensor, Vec<usize>)> {
        let op = "all_to_all";
        let local = rank1(t, op)
            .and_then(|()| check_send_rows(self.world, t, send_rows))
            .and_then(|()| self.check_local(op, t));
        let extra = send_rows.iter().map(|&r| r as u64).collect();
        let all = self.agree(op, local, t.dtype(), t.shape(), extra, Agree::Trailing)?;
        let recv_rows: Vec<usize> = all.iter().map(|h| h.extra[self.rank] as usize).collect();
        let mut shape = t.shape().to_vec();
        shape[0] = recv_rows.iter().sum();
        let out = Tensor::empty(&self.client, t.dtype(), &shape)?;
        let (ptrs, _keep) = self.addresses(op, &[t, &out])?;
        let row = Self::row_bytes(t.dtype(), t.shape()) as u64;
        let (mut s_off, mut r_off) = (0u64, 0u64);
        let mut sends = Vec::with_capacity(self.world);
        let mut recvs = Vec::with_capacity(self.world);
        for peer in 0..self.world {
            let (s, r) = (send_rows[peer] as u64, recv_rows[peer] as u64);
            sends.push((ptrs[0] + s_off * row, (s * row) as usize, peer));
            recvs.push((ptrs[1] + r_off * row, (r * row) as usize, peer));
            s_off += s;
            r_off += r;
        }
        self.move_bytes(op, None, &sends, &recvs)?;
        Ok((out, recv_rows))
    }

    fn all_reduce(&self, t: &Tensor) -> Result<Tensor> {
        let op = "all_reduce";
        let local = check_reducible(t).and_then(|()| self.check_local(op, t));
        self.agree(op, local, t.dtype(), t.shape(), vec![], Agree::Whole)?;
        let out = Tensor::empty(&self.client, t.dtype(), t.shape())?;
        let (ptrs, _keep) = self.addresses(op, &[t, &out])?;
        let dtype = match t.dtype() {
            DType::F16 => nccl_dtype::FLOAT16,
            DType::BF16 => nccl_dtype::BFLOAT16,
            _ => nccl_dtype::FLOAT32,
        };
        let count = t.numel();
        self.run(op, None, |nccl, comm, stream| {
            // SAFETY: both addresses hold `count` elements of `dtype` on this device.
            let rc = unsafe {
                (nccl.all_reduce)(
                    ptrs[0] as _,
                    ptrs[1] as _,
                    count,
                    dtype,
                    ffi::SUM,
                    comm,
                    stream,
                )
            };
            nccl.check(rc, "ncclAllReduce")
        })?;
        Ok(out)
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let op = "all_gather";
        let local = rank1(t, op).and_then(|()| self.check_local(op, t));
        let all = self.agree(op, local, t.dtype(), t.shape(), vec![], Agree::Trailing)?;
        let rows: Vec<usize> = all.iter().map(|h| h.shape[0]).collect();
        let mut shape = t.shape().to_vec();
        shape[0] = rows.iter().sum();
        let out = Tensor::empty(&self.client, t.dtype(), &shape)?;
        let (ptrs, _keep) = self.addresses(op, &[t, &out])?;
        let row = Self::row_bytes(t.dtype(), t.shape());
        if rows.iter().all(|&r| r == rows[0]) {
            let bytes = rows[0] * row;
            return self
                .run(op, None, |nccl, comm, stream| {
                    // SAFETY: `ptrs[0]` holds `bytes`, `ptrs[1]` `bytes` per rank.
                    let rc = unsafe {
                        (nccl.all_gather)(
                            ptrs[0] as _,
                            ptrs[1] as _,
                            bytes,
                            nccl_dtype::UINT8,
                            comm,
                            stream,
                        )
                    };
                    nccl.check(rc, "ncclAllGather")
                })
                .map(|()| out);
        }
        // Uneven rows: every rank sends its rows to every rank, in one group.
        let mut offset = 0u64;
        let mut recvs = Vec::with_capacity(self.world);
        for (peer, &r) in rows.iter().enumerate() {
            recvs.push((ptrs[1] + offset, r * row, peer));
            offset += (r * row) as u64;
        }
        let sends: Vec<_> = (0..self.world)
            .map(|peer| (ptrs[0], t.numel() * t.dtype().size(), peer))
            .collect();
        self.move_bytes(op, None, &sends, &recvs)?;
        Ok(out)
    }

    fn barrier(&self) -> Result<()> {
        self.agree("barrier", Ok(()), DType::U8, &[0], vec![], Agree::Whole)
            .map(|_| ())
    }
}
