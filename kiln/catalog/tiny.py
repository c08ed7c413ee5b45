"""Tiny models built on the spot, for the catalog's tests, benchmark and demo (`kiln demo
--chat-model tiny`): random weights
from a fixed seed, saved with `save_pretrained` so that `from_pretrained(directory)` loads them
like a model from the hub. Nothing is downloaded, and each builds in about a second on a CPU.

The tokenizers need no vocabulary file: every byte is a token (GPT-2's byte-level alphabet,
built with the `tokenizers` library), so any text encodes, and a token decodes to the
character it was. transformers' `ByT5Tokenizer` would do that too, but it appends an EOS
token to every text it encodes, which a causal model's prompt must not end with.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

__all__ = [
    "CHAT_CONTEXT",
    "CHAT_TEMPLATE",
    "EMBEDDING_MAX_LENGTH",
    "tiny_chat_model",
    "tiny_embedding_model",
    "tiny_image_pipeline",
    "tiny_speech_model",
    "tiny_whisper_model",
]

# Renders [{"role": "user", "content": "hi"}] as "<|user|>hi\n<|assistant|>" (with the
# generation prompt): the tests find these markers in what the model read.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHAT_CONTEXT = 256
EMBEDDING_MAX_LENGTH = 64
# What the chat model writes: letters, spaces and a little punctuation, one byte per token, so
# each token is one character of text (and the demo's replies are readable, if meaningless).
_WRITTEN = string.ascii_letters + " .,"


def tiny_chat_model(directory: Path, *, layers: int = 2, width: int = 64, heads: int = 4) -> Path:
    """A GPT-2 (two layers, 64 wide, by default) with a 256-token context and a chat template,
    in `directory`.

    Its output layer is its own (not tied to the embedding) and gives every token other than
    `_WRITTEN`'s characters a logit of 0, far below theirs: it never writes EOS, so it runs
    until `max_tokens` or its context ends, and it always writes printable text."""
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    tokenizer = _byte_tokenizer(eos="<|endoftext|>", pad="<|pad|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    eos, pad = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|pad|>"])
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=CHAT_CONTEXT,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model: Any = GPT2LMHeadModel(config).eval()  # type: ignore[no-untyped-call]
    written = [tokenizer(char, add_special_tokens=False)["input_ids"][0] for char in _WRITTEN]
    _writes_only(model.lm_head.weight, written)
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=eos, eos_token_id=eos, pad_token_id=pad
    )
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return _readable(directory)


def tiny_embedding_model(directory: Path) -> Path:
    """A two-layer BERT (64 dimensions) that reads at most `EMBEDDING_MAX_LENGTH` tokens, with
    a byte tokenizer that wraps each text in [CLS] ... [SEP], in `directory`."""
    import torch
    from tokenizers.processors import TemplateProcessing
    from transformers import BertConfig, BertModel

    tokenizer = _byte_tokenizer(
        pad="[PAD]", cls="[CLS]", sep="[SEP]", model_max_length=EMBEDDING_MAX_LENGTH
    )
    cls, sep = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]"])
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=EMBEDDING_MAX_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model: Any = BertModel(config).eval()  # type: ignore[no-untyped-call]
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return _readable(directory)


def tiny_image_pipeline(directory: Path) -> Path:
    """A Stable Diffusion pipeline of tiny random parts (UNet, VAE, CLIP text encoder, DDIM),
    whose images are noise, in `directory`. Needs diffusers."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # type: ignore[no-untyped-call]
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(  # type: ignore[no-untyped-call]
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in alphabet:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    scheduler = DDIMScheduler(  # type: ignore[no-untyped-call]
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline: Any = StableDiffusionPipeline(  # type: ignore[no-untyped-call]
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    directory.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(directory)
    return _readable(directory)


# Whisper's special tokens, in the order its tokenizer and generation config name them.
_WHISPER_SPECIALS = (
    "<|startoftranscript|>", "<|en|>", "<|fr|>", "<|translate|>", "<|transcribe|>",
    "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>",
)  # fmt: skip
WHISPER_NEW_TOKENS = 20  # what the tiny recogniser writes for any piece of speech


def tiny_whisper_model(directory: Path) -> Path:
    """A Whisper (two encoder and two decoder layers, 64 wide) with a byte tokenizer, English
    and French, in `directory`, with its processor (80 mel bins).

    Like the chat model, it writes only `_WRITTEN`'s characters and never EOS: each piece of
    speech reads as `WHISPER_NEW_TOKENS` characters of readable nonsense."""
    import torch
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    vocab = {char: index for index, char in enumerate(sorted(ByteLevel.alphabet()))}
    eos = vocab["<|endoftext|>"] = len(vocab)
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>")  # noqa: S106
    tokenizer.add_special_tokens({"additional_special_tokens": list(_WHISPER_SPECIALS)})
    found: list[int] = tokenizer.convert_tokens_to_ids(list(_WHISPER_SPECIALS))  # type: ignore[assignment]
    ids = dict(zip(_WHISPER_SPECIALS, found, strict=True))
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        encoder_layers=2,
        decoder_layers=2,
        d_model=64,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_target_positions=WHISPER_NEW_TOKENS + 4,  # the prompt's four tokens, then the text
        decoder_start_token_id=ids["<|startoftranscript|>"],
        eos_token_id=eos,
        pad_token_id=eos,
        bos_token_id=eos,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model: Any = WhisperForConditionalGeneration(config).eval()  # type: ignore[no-untyped-call]
    _writes_only(model.proj_out.weight, [vocab[char] for char in _WRITTEN.replace(" ", "Ġ")])
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        decoder_start_token_id=ids["<|startoftranscript|>"],
        eos_token_id=eos,
        pad_token_id=eos,
        bos_token_id=eos,
        lang_to_id={"<|en|>": ids["<|en|>"], "<|fr|>": ids["<|fr|>"]},
        task_to_id={"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        is_multilingual=True,
    )
    features = WhisperFeatureExtractor(feature_size=80)  # type: ignore[no-untyped-call]
    processor = WhisperProcessor(feature_extractor=features, tokenizer=tokenizer)  # type: ignore[no-untyped-call]
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return _readable(directory)


def tiny_speech_model(directory: Path) -> Path:
    """A VITS text-to-speech model (two layers, 32 wide, 16 kHz) that reads lowercase letters,
    digits and punctuation, in `directory`. Its voice is noise shaped by random weights."""
    import json

    import torch
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    symbols = ["<pad>", *(" " + string.ascii_lowercase + string.digits + ".,!?'-")]
    (directory / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(symbols)}))
    tokenizer = VitsTokenizer(
        vocab_file=str(directory / "vocab.json"),
        pad_token="<pad>",  # noqa: S106
        unk_token="<pad>",  # noqa: S106
        add_blank=True,
        normalize=True,
        phonemize=False,
        language=None,
    )
    config = VitsConfig(
        vocab_size=len(symbols),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=64,
        flow_size=32,
        spectrogram_bins=65,
        upsample_initial_channel=32,
        upsample_rates=[8, 8, 2, 2],
        upsample_kernel_sizes=[16, 16, 4, 4],
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3, 5]],
        prior_encoder_num_flows=2,
        prior_encoder_num_wavenet_layers=2,
        posterior_encoder_num_wavenet_layers=2,
        duration_predictor_num_flows=2,
        duration_predictor_filter_channels=32,
        depth_separable_num_layers=2,
        sampling_rate=16_000,
    )
    torch.manual_seed(0)
    model: Any = VitsModel(config).eval()  # type: ignore[no-untyped-call]
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return _readable(directory)


def _writes_only(weight: Any, written: list[int]) -> None:
    """Give an output layer's rows random weights for the `written` tokens only (every other
    token's logit is 0, far below theirs)."""
    import torch

    with torch.no_grad():
        scaled = torch.randn(
            len(written), weight.shape[1], generator=torch.Generator().manual_seed(1)
        )
        weight.zero_()
        weight[written] = scaled * 3.0


def _byte_tokenizer(**specials: Any) -> Any:
    """A fast tokenizer with one token per byte, then the given special tokens (by their
    names: eos, pad, cls, sep, ...; `model_max_length` passes through)."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    options = {"model_max_length": specials.pop("model_max_length", CHAT_CONTEXT)}
    vocab = {char: index for index, char in enumerate(sorted(ByteLevel.alphabet()))}
    for token in dict.fromkeys(specials.values()):
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    named = {f"{name}_token": token for name, token in specials.items()}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **named, **options)  # type: ignore[no-untyped-call]


def _readable(directory: Path) -> Path:
    """Let sandboxed replicas (other users) read the model: transformers writes its weights
    readable by their owner only."""
    for path in [directory, *directory.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return directory
