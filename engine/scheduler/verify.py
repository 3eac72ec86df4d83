"""The decode step's speculative part (a mixin of :class:`engine.scheduler.core.SchedulerCore`):
plan each speculating sequence's drafts, verify them in the same model call as the other
sequences' tokens (``Model.decode_rows``), and take the accepted ones
(:mod:`engine.scheduler.speculate` proposes and accepts)."""

from __future__ import annotations

import numpy as np

from engine.sampling import logprobs_topn
from engine.scheduler.sequence import Sequence


class SpeculativeSteps:
    """Uses the core's batch, blocks, model, block_size, _max_rows and _publish_step."""

    def _plan_drafts(self, seqs: list[Sequence]) -> int:
        """Each speculating sequence's drafts for this step (engine.scheduler.speculate) into
        ``batch.drafts``, with blocks for them (none when the pool is dry: it then decodes one
        token); returns the step's draft rows."""
        batch = self.batch
        ks = batch.drafts
        total, budget = 0, self._max_rows - len(seqs)
        capacity = self.block_size
        for i, seq in enumerate(seqs):
            ks[i] = 0
            sp = seq.spec
            if sp is None or budget <= total:
                continue
            n = seq.n_tokens
            k = sp.draft(seq.tokens, n, min(seq.policy.end - n, budget - total + 1), len(seqs),
                         len(seqs) + total)
            if not k:
                continue
            have = len(seq.blocks)
            if n + k > have * capacity:
                if not self.blocks.ensure(seq, n + k):
                    continue
                batch.tables[i, have : len(seq.blocks)] = seq.blocks[have:]
            ks[i] = k
            total += k
        return total

    def _verify_rows(self, B: int, drafts: int):
        """One model call: every sequence's last token, and a speculating one's drafts after it
        at the next positions (same block table row)."""
        b = self.batch
        toks, pos, rseq, ks = b.row_tokens, b.row_positions, b.row_seq, b.drafts
        t = 0
        for i, seq in enumerate(b.seqs):
            p = b.positions[i]
            toks[t] = b.tokens[i]
            pos[t] = p
            rseq[t] = i
            t += 1
            k = ks[i]
            if k:
                toks[t : t + k] = seq.spec.drafts[:k]
                pos[t : t + k] = np.arange(p + 1, p + 1 + k, dtype=np.int32)
                rseq[t : t + k] = i
                t += k
        return self.model.decode_rows(toks[:t], pos[:t], rseq[:t], b.tables[:B])

    def _after_verify(self, items, seqs, logits, picks, engine_ns, now) -> int:
        """The tokens of a step that verified drafts: a speculating row's accepted drafts and its
        correction or bonus token (engine.scheduler.speculate.Speculator.accept), another row's
        one token."""
        b = self.batch
        B = len(seqs)
        ks = b.drafts
        tokens: list = [0] * B
        spec = {}
        lps = None
        finished = []
        r = 0  # the row of seqs[i]'s last token
        for i, seq in enumerate(seqs):
            pol = seq.policy
            k = ks[i]
            n = seq.n_tokens
            if k:
                m, _, reason = seq.spec.accept(pol, logits[r : r + k + 1], picks[r : r + k + 1],
                                               seq.tokens, n, k)
                toks = seq.tokens[n : n + m].tolist()
                tokens[i] = toks
                spec[i] = k
            else:
                tok = int(picks[r]) if pol.greedy else pol.pick(logits[r], seq.tokens[:n])
                seq.tokens[n] = tok
                m, toks = 1, [tok]
                tokens[i] = tok
                reason = pol.finish_reason(tok, n + 1)
            if pol.n_logprobs:
                lps = lps or {}
                lp = [logprobs_topn(logits[r + j], t, pol.n_logprobs) for j, t in enumerate(toks)]
                lps[i] = lp if k else lp[0]
            seq.n_tokens = n + m
            seq.num_computed = n + m - 1  # the KV of rejected drafts' positions is overwritten later
            b.tokens[i] = toks[-1]
            b.positions[i] = n + m - 1
            if reason is not None:
                finished.append((seq, reason))
            r += k + 1
        self._publish_step(items, tokens, engine_ns, B, now, lps, spec, finished)
        return B
