"""val_bpb accounting: sentencepiece byte LUTs (real sp1024), window coverage, exactness of eval_val."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train_gpt as tg
from conftest import NO_SHARED, SP1024


@pytest.fixture(scope="module")
def sp():
    if not SP1024.is_file():
        pytest.skip(NO_SHARED)
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(SP1024))


def token_bytes(ids: list[int], luts) -> list[int]:
    """Bytes of each target ids[i] (i >= 1) given the previous token ids[i - 1]."""
    base, space, boundary = luts
    return [int(base[y]) + int(bool(space[y]) and not bool(boundary[x])) for x, y in zip(ids, ids[1:])]


def test_luts_special_pieces(sp):
    base, space, boundary = tg.build_sentencepiece_luts(sp, 1024)
    assert boundary[:4].all() and (base[:4] == 0).all()
    assert (base[4:260] == 1).all() and not space[4:260].any() and not boundary[4:260].any()
    assert sp.id_to_piece(939) == "\u2581" and base[939] == 0 and space[939]


def test_bytes_hand_computed_with_byte_fallback(sp):
    text = "Hello world, 東京 🙂 12"
    ids = sp.encode(text)
    assert [sp.id_to_piece(i) for i in ids] == [
        "H", "ell", "o", "▁wor", "ld", ",", "▁", "<0xE6>", "<0x9D>", "<0xB1>", "<0xE4>", "<0xBA>", "<0xAC>",
        "▁", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>", "▁", "1", "2"]
    per_token = token_bytes([tg.BOS_ID, *ids], tg.build_sentencepiece_luts(sp, 1024))
    assert per_token == [1, 3, 1, 4, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    assert sum(per_token) == len(text.encode("utf-8")) == 27


def test_leading_space_after_bos_is_not_counted(sp):
    """nmt_nfkc strips a document's leading space, so a "▁" piece right after BOS adds no space byte."""
    luts = tg.build_sentencepiece_luts(sp, 1024)
    wor, ld = sp.piece_to_id("▁wor"), sp.piece_to_id("ld")
    assert sp.encode(" world") == sp.encode("world") != [wor, ld]
    assert token_bytes([tg.BOS_ID, wor, ld], luts) == [3, 2]
    assert token_bytes([ld, wor, ld], luts) == [4, 2]
    assert token_bytes([sp.piece_to_id("<0x41>"), wor], luts) == [4]


def test_vocab_mismatch_is_an_error(sp):
    with pytest.raises(tg.FatalError, match="1024 pieces but VOCAB_SIZE=2048"):
        tg.build_sentencepiece_luts(sp, 2048)


@pytest.mark.parametrize("n,seq_len,stride", [(1000, 64, 64), (1000, 64, 24), (1000, 64, 1), (30, 64, 16), (64, 64, 16),
                                              (65, 64, 64), (129, 32, 31)])
def test_windows_score_every_target_once_with_full_context(n, seq_len, stride):
    windows = tg.eval_windows(n, seq_len, stride)
    scored = [p for _, end, first in windows for p in range(first, end)]
    assert scored == list(range(n))
    for start, end, first in windows:
        assert end - start == min(seq_len, n) and start <= first < end
        assert start == 0 or first - start >= seq_len - stride


class Bigram(nn.Module):
    """Context-free logits: its loss on a target does not depend on the window it is scored in."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab))

    def forward_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


def random_luts(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 4, (vocab,), generator=g), torch.rand(vocab, generator=g) < 0.4,
            torch.rand(vocab, generator=g) < 0.1)


@pytest.mark.parametrize("n,seq_len,stride,batch", [(1001, 64, None, 4), (1001, 64, 24, 3), (1001, 64, 64, 5),
                                                    (31, 64, 16, 2), (300, 16, 1, 64)])
def test_eval_val_is_exact(n, seq_len, stride, batch):
    torch.manual_seed(n)
    vocab = 50
    model, luts = Bigram(vocab), random_luts(vocab)
    tokens = torch.randint(0, vocab, (n,), dtype=torch.int32)
    tokens[::37] = 1
    x, y = tokens[:-1].long(), tokens[1:].long()
    nll = F.cross_entropy(model.table[x].double(), y, reduction="sum").item()
    n_bytes = sum(token_bytes(tokens.tolist(), luts))
    loss, bpb = tg.eval_val(model, tokens, luts, seq_len, stride=stride, batch_seqs=batch)
    assert loss == pytest.approx(nll / (n - 1), rel=1e-6)
    assert bpb == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-6)


def test_plain_equals_sliding_at_full_stride_and_context_helps():
    from test_model import random_model

    model = random_model({})
    tokens = torch.randint(2, 1024, (700,), dtype=torch.int32)
    luts = random_luts(1024)
    plain = tg.eval_val(model, tokens, luts, 128)
    assert tg.eval_val(model, tokens, luts, 128, stride=128, batch_seqs=3) == plain
    assert tg.eval_val(model, tokens, luts, 128, stride=32)[0] != plain[0]


def test_documents_score_every_target_once_and_their_windows_stay_inside():
    tokens = torch.tensor([5, 6, tg.BOS_ID, 7, 8, 9, tg.BOS_ID, 4, tg.BOS_ID], dtype=torch.int32)
    assert tg.documents(tokens) == [(0, 2), (2, 6), (6, 8)]
    assert tg.documents(tokens[2:]) == [(0, 4), (4, 6)]
    assert tg.document_windows((100, 390), 64, 128) == [(100, 164, 100), (100, 228, 164), (164, 292, 228),
                                                         (228, 356, 292), (262, 390, 356)]


LORA_DOCS = (0, 200, 450)  # BOS positions of a 700-token stream: documents of 200, 250 and 249 targets


def lora_chunks(tokens: torch.Tensor, epochs: int, world: tuple[int, int] = (0, 1), batch: int = 2,
                budget: tg.EvalBudget | None = None):
    """eval_lora_ttt on a fresh random model: seq 128, chunks of 64 targets, rank 4."""
    from test_model import random_model

    model = random_model({})
    args = dataclasses.replace(model.args, ttt_doc_chunk=64, ttt_lora_rank=4, ttt_lora_lr=0.05,
                               ttt_epochs=epochs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tg.eval_lora_ttt(model, tokens, random_luts(1024), args, batch, *world, budget=budget)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(m.lora is None for m in tg.block_matrices(model).values()) and all(p.requires_grad for p in model.parameters())
    return out


def test_lora_ttt_scores_each_chunk_before_training_on_it_and_documents_never_meet():
    """Chunks (document, first target): doc 0 at 0, 64, 128, 192; doc 1 at 200, 264, 328, 392; doc 2 at 450, ...
    Perturbing doc 1 from target 329 on (its third chunk) must leave doc 1's first two chunks and every chunk of
    docs 0 and 2 bit-identical: an adapter trained on an unscored token, or shared across documents, changes them.
    The text uses 48 token ids only, so there is something to adapt to: TTT must lower the loss."""
    tokens = torch.randint(2, 50, (700,), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    tokens[list(LORA_DOCS)] = tg.BOS_ID
    loss, bpb, chunks = lora_chunks(tokens, epochs=2)
    assert chunks.shape == (4 + 4 + 4, 3) and int(chunks[:, 1].sum()) == 699
    changed = tokens.clone()
    changed[329:450] = torch.randint(2, 1024, (121,), dtype=torch.int32)
    perturbed = lora_chunks(changed, epochs=2)[2]
    same = [i for i in range(12) if i not in (6, 7)]
    assert torch.equal(perturbed[same], chunks[same]) and not torch.equal(perturbed[6], chunks[6])
    no_ttt = lora_chunks(tokens, epochs=0)
    firsts = [0, 4, 8]
    assert torch.equal(no_ttt[2][firsts], chunks[firsts]) and not torch.equal(no_ttt[2][1], chunks[1])
    assert loss < no_ttt[0] and (loss, bpb) == tg.loss_and_bpb(chunks.sum(0))
    halves = [lora_chunks(tokens, epochs=2, world=(r, 2))[2] for r in (0, 1)]  # batches [doc 0, doc 1], [doc 2]
    assert torch.equal(halves[0][8:], torch.zeros(4, 3, dtype=torch.float64)) and torch.equal(halves[0] + halves[1], chunks)


class SteppedBudget(tg.EvalBudget):
    """An EvalBudget that says yes to its first fits_before_stop questions and no after: adapting stops at a known step."""

    def __init__(self, fits_before_stop: int):
        super().__init__(100.0, torch.device("cpu"), 1e-9)
        self.calls, self.fits_before_stop = 0, fits_before_stop

    def fits(self, seconds: float) -> bool:
        self.calls += 1
        return self.calls <= self.fits_before_stop


@pytest.mark.parametrize("stop", [0, 1, 2])
def test_lora_ttt_stops_adapting_where_the_budget_says_and_still_scores_every_target_once(stop):
    """Adapting stops before the step the budget refuses (one document per step): the documents before it score as
    with an unlimited budget, those from it on as with no TTT at all, and the targets and bytes are the plain
    evaluation's, whatever the stop."""
    from test_model import random_model

    tokens = torch.randint(2, 50, (700,), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    tokens[list(LORA_DOCS)] = tg.BOS_ID
    budget = SteppedBudget(stop)
    chunks = lora_chunks(tokens, epochs=2, batch=1, budget=budget)[2]
    full, none = lora_chunks(tokens, epochs=2, batch=1)[2], lora_chunks(tokens, epochs=0, batch=1)[2]
    assert budget.calls == stop + 1 and torch.equal(chunks[:4 * stop], full[:4 * stop])
    assert torch.equal(chunks[4 * stop:], none[4 * stop:]) and not torch.equal(chunks, full)
    plain = tg.score_windows(random_model({}), tokens, random_luts(1024), tg.eval_windows(699, 128, 32), 2)
    assert torch.equal(chunks[:, 1:].sum(0), plain[1:])


def test_an_unlimited_budget_changes_nothing():
    tokens = torch.randint(2, 50, (700,), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    tokens[list(LORA_DOCS)] = tg.BOS_ID
    budget = tg.EvalBudget(1e6, torch.device("cpu"), 1e-9)
    assert torch.equal(lora_chunks(tokens, epochs=1, budget=budget)[2], lora_chunks(tokens, epochs=1)[2])
