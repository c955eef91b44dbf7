"""Generation: a KV cache, greedy decoding, beam search (HF's scoring) and sampling (HF's filters), batched."""

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from mrgfast.layout import Segments
from mrgfast.models.decoder import Decoder

NEG = -1.0e9  # HF's "impossible" score; kept identical so beam choices match transformers' beam search


class KVCache:
    """Keys and values of N sequences for every layer, in buffers [N, capacity, kv_heads, head_dim], plus the
    filled length of each sequence. Decoder.forward appends to it; `reorder` follows beam search."""

    def __init__(self, decoder: Decoder, num_seqs: int, capacity: int):
        weight = decoder.model.embed_tokens.weight
        config = decoder.config
        shape = (num_seqs, capacity, config.num_key_value_heads, config.head_dim)
        self.keys = [weight.new_empty(shape) for _ in range(config.num_hidden_layers)]
        self.values = [weight.new_empty(shape) for _ in range(config.num_hidden_layers)]
        self.lengths = [0] * num_seqs
        self.capacity = capacity
        self.pending = None

    def begin(self, new_lengths: Sequence[int]) -> None:
        """Prepare one forward that appends new_lengths[i] tokens (contiguous in the packed stream) to sequence i."""
        if len(new_lengths) != len(self.lengths):
            raise ValueError(f"KVCache holds {len(self.lengths)} sequences, the forward has {len(new_lengths)}")
        totals = [n + m for n, m in zip(self.lengths, new_lengths)]
        if max(totals, default=0) > self.capacity:
            raise ValueError(f"KVCache capacity {self.capacity} exceeded: sequences would reach {max(totals)}")
        device = self.keys[0].device if self.keys else torch.device("cpu")
        write = self.flat_index(self.lengths, new_lengths, device)
        read = self.flat_index([0] * len(totals), totals, device)
        self.pending = (write, read, Segments.from_lengths(totals, device), list(new_lengths))

    @staticmethod
    def flat_index(starts: Sequence[int], counts: Sequence[int], device):
        """(sequence, slot) index pairs of slots start..start+count of every sequence, in order."""
        counts_t = torch.tensor(counts, dtype=torch.long)
        seq = torch.repeat_interleave(torch.arange(len(counts)), counts_t)
        # Position within each run, plus that run's start slot.
        run_start = torch.cumsum(counts_t, 0) - counts_t
        slot = torch.arange(int(counts_t.sum())) - run_start[seq] + torch.tensor(starts, dtype=torch.long)[seq]
        return seq.to(device), slot.to(device)

    def update(self, layer: int, k: Tensor, v: Tensor):
        """Store the new k, v [T_new, kv_heads, D] of `layer`; return all keys and values of every sequence,
        packed, with their Segments."""
        if self.pending is None:
            raise RuntimeError("KVCache.update outside a forward: call begin(new_lengths) first")
        (w_seq, w_slot), (r_seq, r_slot), seg, _ = self.pending
        # Gathering the cached keys into a packed stream copies about what attention reads anyway, and lets
        # decoding use the same varlen attention as training and prefill.
        self.keys[layer][w_seq, w_slot] = k
        self.values[layer][w_seq, w_slot] = v
        return self.keys[layer][r_seq, r_slot], self.values[layer][r_seq, r_slot], seg

    def commit(self) -> None:
        """Count the tokens appended by the forward just run."""
        self.lengths = [n + m for n, m in zip(self.lengths, self.pending[3])]
        self.pending = None

    def reorder(self, index: Sequence[int]) -> None:
        """Keep sequence index[j] as the new sequence j (beams chosen, finished rows dropped, rows repeated)."""
        rows = torch.tensor(list(index), dtype=torch.long, device=self.keys[0].device)
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.lengths = [self.lengths[i] for i in index]


@torch.no_grad()
def generate(decoder: Decoder, input_ids: Union[Tensor, Sequence[Sequence[int]], None] = None,
             attention_mask: Optional[Tensor] = None, *, inputs_embeds: Optional[Tensor] = None,
             position_ids: Optional[Tensor] = None, max_new_tokens: int = 32,
             eos_token_id: Union[int, Sequence[int], None] = None, num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool = False, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, generator: Optional[torch.Generator] = None) -> list:
    """New token ids per prompt (a list of lists, eos included when produced): greedy, beam search, or sampled.

    Prompts are input_ids [B, S] or inputs_embeds [B, S, hidden] with attention_mask [B, S] marking real tokens
    (any padding side), or a list of token-id lists. position_ids ([B, S], or [3, B, S] for M-RoPE) default to
    0.. over each prompt's real tokens; generated tokens continue from the prompt's largest position + 1.
    Beam search scores as transformers does (length_penalty, early_stopping True/False). do_sample draws each
    token from softmax(logits / temperature) after transformers' top_k and top_p filters (0 and 1.0: off), using
    `generator` (None: torch's global CPU one); it draws one sequence per prompt, so it needs num_beams=1.
    Dropout (LoRA's too) follows the decoder's mode: call decoder.eval() first.
    """
    check_generate_args(max_new_tokens, num_beams)
    if do_sample:
        check_sampling_args(num_beams, temperature, top_k, top_p)
    embeds, positions, lengths, next_pos = pack_prompts(decoder, input_ids, attention_mask, inputs_embeds,
                                                        position_ids)
    eos = torch.tensor([] if eos_token_id is None else
                       [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), dtype=torch.long)
    cache = KVCache(decoder, len(lengths), max(lengths) + max_new_tokens)
    hidden = decoder(inputs_embeds=embeds, position_ids=positions, cu_seqlens=Segments.from_lengths(
        lengths, "cpu").bounds, cache=cache)
    last = torch.tensor(lengths, device=embeds.device).cumsum(0) - 1
    logits = decoder.compute_logits(hidden[0, last]).float()
    if do_sample:
        def draw(step_logits: Tensor) -> Tensor:
            probs = torch.softmax(filter_logits(step_logits, temperature, top_k, top_p), -1)
            # Drawn where the generator lives (the CPU by default), so a seed gives the same tokens on any device.
            where = generator.device if generator is not None else torch.device("cpu")
            return torch.multinomial(probs.to(where), 1, generator=generator)[:, 0].cpu()
        return decode_one_each(decoder, cache, logits, next_pos, eos, max_new_tokens, draw)
    if num_beams == 1:
        return decode_one_each(decoder, cache, logits, next_pos, eos, max_new_tokens, lambda x: x.argmax(-1).cpu())
    return beam_search(decoder, cache, logits, next_pos, eos, max_new_tokens, num_beams, length_penalty,
                       early_stopping)


def check_generate_args(max_new_tokens, num_beams) -> None:
    """ValueError naming max_new_tokens or num_beams when it is not a positive int."""
    for name, value in (("max_new_tokens", max_new_tokens), ("num_beams", num_beams)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_sampling_args(num_beams, temperature, top_k, top_p) -> None:
    """ValueError naming the sampling argument that is out of range (or num_beams > 1, which sampling lacks)."""
    if num_beams != 1:
        raise ValueError(f"do_sample draws one sequence per prompt: num_beams must be 1, got {num_beams}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1.0: off), got {top_p!r}")


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Logits [N, vocab] divided by temperature, then with tokens outside the top_k and outside the top_p nucleus
    set to -inf, in transformers' order and by its rules (ties with the k-th logit kept; the most likely token is
    always kept)."""
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(logits, dim=-1)
        cumulative = ascending.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def pack_prompts(decoder: Decoder, input_ids, attention_mask, inputs_embeds, position_ids):
    """The prompts' real tokens packed into one row: (embeds [1, T, H], positions [1, T] or [3, 1, T],
    prompt lengths, and the position of each prompt's first generated token)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("generate: pass exactly one of input_ids or inputs_embeds")
    device = decoder.model.embed_tokens.weight.device
    if input_ids is not None and not isinstance(input_ids, Tensor):
        if attention_mask is not None:
            raise ValueError("generate: attention_mask goes with a padded input_ids tensor, not a list of prompts")
        rows = [torch.as_tensor(list(r), dtype=torch.long) for r in input_ids]
        input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True) if rows else None
        attention_mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True) \
            if rows else None
    if input_ids is not None:
        if input_ids.dim() != 2 or input_ids.shape[0] == 0:
            raise ValueError(f"input_ids must be a non-empty [batch, seq] tensor, got shape {tuple(input_ids.shape)}")
        inputs_embeds = decoder.embed(input_ids.to(device))
    if inputs_embeds.dim() != 3:
        raise ValueError(f"inputs_embeds must be [batch, seq, hidden], got shape {tuple(inputs_embeds.shape)}")
    batch, seq, hidden = inputs_embeds.shape
    mask = torch.ones(batch, seq, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
    if tuple(mask.shape) != (batch, seq):
        raise ValueError(f"attention_mask must be [{batch}, {seq}], got shape {tuple(mask.shape)}")
    lengths = mask.sum(1).tolist()
    if min(lengths) == 0:
        raise ValueError(f"generate: prompt {lengths.index(0)} has no tokens (attention_mask all zero)")
    keep = mask.flatten().to(inputs_embeds.device)
    embeds = inputs_embeds.reshape(batch * seq, hidden)[keep][None]
    if position_ids is None:
        positions = torch.cat([torch.arange(n) for n in lengths]).to(inputs_embeds.device)[None]
        return embeds, positions, lengths, list(lengths)
    if tuple(position_ids.shape[-2:]) != (batch, seq) or position_ids.dim() not in (2, 3):
        raise ValueError(f"position_ids must be [{batch}, {seq}] or [3, {batch}, {seq}], "
                         f"got shape {tuple(position_ids.shape)}")
    axes = position_ids.shape[:-2]
    flat = position_ids.reshape(*axes, batch * seq)[..., keep.to(position_ids.device)]
    per_row = flat.reshape(-1, flat.shape[-1]).amax(0).split(lengths)
    next_pos = [int(p.max()) + 1 for p in per_row]
    return embeds, flat.reshape(*axes, 1, -1).to(inputs_embeds.device), lengths, next_pos


def decode_step(decoder: Decoder, cache: KVCache, tokens: Tensor, positions: Sequence[int]) -> Tensor:
    """fp32 next-token logits [N, vocab] after feeding one token per cached sequence at the given positions."""
    device = cache.keys[0].device
    ids = tokens.to(device)[None]
    pos = torch.tensor(list(positions), device=device)[None]
    hidden = decoder(input_ids=ids, position_ids=pos, cu_seqlens=list(range(len(positions) + 1)), cache=cache)
    return decoder.compute_logits(hidden[0]).float()


def decode_one_each(decoder: Decoder, cache: KVCache, logits: Tensor, next_pos: list, eos: Tensor,
                    max_new_tokens: int, choose: Callable[[Tensor], Tensor]) -> list:
    """One sequence per prompt, each token picked by `choose(logits [N, vocab]) -> CPU token ids [N]` (greedy:
    argmax; sampling: a draw); rows that produce eos leave the batch (and the cache) at once."""
    outputs = [[] for _ in next_pos]
    active = list(range(len(next_pos)))
    stop = set(eos.tolist())
    for step in range(max_new_tokens):
        tokens = choose(logits)
        still = []
        for j, row in enumerate(active):
            outputs[row].append(int(tokens[j]))
            if int(tokens[j]) not in stop:
                still.append(j)
        if step + 1 == max_new_tokens or not still:
            break
        if len(still) < len(active):
            cache.reorder(still)
            tokens = tokens[still]
        active = [active[j] for j in still]
        logits = decode_step(decoder, cache, tokens, [next_pos[row] + step for row in active])
    return outputs


class Finished:
    """The best k finished hypotheses of each prompt: tokens [B, k, max_new], lengths, scores and whether the slot
    is filled (empty slots score NEG, as in transformers)."""

    def __init__(self, batch: int, k: int, max_new_tokens: int):
        self.tokens = torch.zeros(batch, k, max_new_tokens, dtype=torch.long)
        self.lengths = torch.zeros(batch, k, dtype=torch.long)
        self.scores = torch.full((batch, k), NEG)
        self.done = torch.zeros(batch, k, dtype=torch.bool)

    def add(self, candidates: Tensor, scores: Tensor, new: Tensor) -> None:
        """Merge the candidates [B, C, n] flagged `new` (scores already length-normalised) into the best k."""
        batch, count, length = candidates.shape
        k, width = self.scores.shape[1], self.tokens.shape[2]
        scores = torch.where(new, scores, torch.tensor(NEG * 2))  # below empty slots: never chosen
        best = torch.topk(torch.cat([self.scores, scores], 1), k).indices
        padded = torch.nn.functional.pad(candidates, (0, width - length))
        self.tokens = torch.cat([self.tokens, padded], 1).gather(1, best[..., None].expand(-1, -1, width))
        self.lengths = torch.cat([self.lengths, torch.full((batch, count), length)], 1).gather(1, best)
        self.scores = torch.cat([self.scores, scores], 1).gather(1, best)
        self.done = torch.cat([self.done, new], 1).gather(1, best)

    def worst(self) -> Tensor:
        """Per prompt, the lowest finished score once all k slots are filled, else NEG."""
        return torch.where(self.done.all(1), self.scores.min(1).values, torch.tensor(NEG))

    def best(self) -> list:
        """The top hypothesis of each prompt as a token list."""
        return [self.tokens[b, 0, :int(self.lengths[b, 0])].tolist() for b in range(self.tokens.shape[0])]


def beam_search(decoder: Decoder, cache: KVCache, logits: Tensor, next_pos: list, eos: Tensor,
                max_new_tokens: int, num_beams: int, length_penalty: float, early_stopping: bool) -> list:
    """Beam search with transformers' rules: keep max(2, 1 + #eos) * beams candidates per step, finished
    hypotheses scored sum_logprob / length ** length_penalty, stop when no running beam can do better."""
    batch, k = len(next_pos), num_beams
    keep = max(2, 1 + len(eos)) * k
    cache.reorder([b for b in range(batch) for _ in range(k)])  # the one prefill becomes k beams
    log_probs = torch.log_softmax(logits, -1)[:, None, :].expand(batch, k, -1)
    vocab = log_probs.shape[-1]
    run_tokens = torch.zeros(batch, k, 0, dtype=torch.long)
    run_scores = torch.full((batch, k), NEG)
    run_scores[:, 0] = 0.0  # all beams start identical: only the first may expand at step one
    finished = Finished(batch, k, max_new_tokens)
    improvable = torch.ones(batch, dtype=torch.bool)
    top_rank = torch.arange(keep) < k
    for step in range(max_new_tokens):
        if step:
            positions = [next_pos[b] + step - 1 for b in range(batch) for _ in range(k)]
            logits = decode_step(decoder, cache, run_tokens[:, :, -1].flatten(), positions)
            log_probs = torch.log_softmax(logits, -1).view(batch, k, vocab)
        # Only the top-k runs over the vocabulary, on the logits' device; the bookkeeping is small, on the CPU.
        totals = log_probs + run_scores.to(log_probs.device)[..., None]
        scores, flat = (t.cpu() for t in torch.topk(totals.view(batch, k * vocab), keep))
        source, token = flat // vocab, flat % vocab
        cand = torch.cat([run_tokens.gather(1, source[..., None].expand(-1, -1, step)), token[..., None]], -1)
        hits = torch.isin(token, eos) | (step + 1 == max_new_tokens)
        # Finished hypotheses come only from the best k candidates, and only while the prompt can improve.
        can_add = improvable[:, None] & ~(finished.done.all(1, keepdim=True) & early_stopping)
        finished.add(cand, scores / (step + 1) ** length_penalty, hits & top_rank & can_add)
        # Running beams: the best k candidates that did not just stop.
        open_scores = scores + hits.float() * NEG
        chosen = torch.topk(open_scores, k).indices
        run_scores = open_scores.gather(1, chosen)
        run_tokens = cand.gather(1, chosen[..., None].expand(-1, -1, step + 1))
        improvable &= run_scores[:, 0] / (step + 1) ** length_penalty > finished.worst()
        if hits.all() or not improvable.any() or (early_stopping and finished.done.all()):
            break
        cache.reorder((torch.arange(batch)[:, None] * k + source.gather(1, chosen)).flatten().tolist())
    return finished.best()
