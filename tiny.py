"""A tiny Qwen3 model and a byte-level BPE tokenizer, built offline and saved with save_pretrained.

The demo and the tests load them back through `from_pretrained`, the same path a real model takes.
"""
import random
import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(corpus, vocab_size=1024, seed=0):
    """Train a byte-level BPE on `corpus` (list of str) plus random pseudo-words; ChatML template."""
    rng = random.Random(seed)
    noise = [" ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(20))
             for _ in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus) + noise, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="left", chat_template=CHATML)


def build_model(tokenizer, layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, seed=0):
    """A random-initialised Qwen3ForCausalLM sized for the tokenizer, tied embeddings, fp32."""
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=2048, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return model


def make_tiny(folder, corpus=("hello world",), vocab_size=1024, seed=0, **sizes):
    """Build a tokenizer and model and save both to `folder`; returns the folder."""
    tokenizer = build_tokenizer(corpus, vocab_size, seed)
    model = build_model(tokenizer, seed=seed, **sizes)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
