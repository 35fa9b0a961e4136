"""The demo corpus: TTS-like ChatML samples drawn from a process whose loss floor is known exactly.

    python examples/demo/make_corpus.py OUT [--params examples/demo/params.json] [--model-config examples/demo]

writes OUT/train.jsonl, OUT/val.jsonl (the format of examples/tiny/samples.jsonl), OUT/codes/*.npy (int16 [K, T])
and OUT/floor.json. The same params (seed included) give the same bytes.

The process (params.json):
  tts    user "speaker S: w1 ... wn" -> assistant clip of frames_per_word * n frames in speaker S's voice
  clone  user sentence -> assistant reference clip of speaker S (before start_index: context, not learnt), user
         sentence -> assistant clip of the same speaker S, who is named nowhere: only the reference tells
  text   user "Say n words." -> assistant " w1 ... wn", each word uniform over the W words (one token each)
  clip   codebook k, frame 0: speaker S's code for k with prob. 1 - first_frame_noise, else uniform over the
         codebook's palette; frame t > 0: the code of frame t-1 with prob. 1 - frame_noise, else uniform over it.
         The palette is a seeded subset of codes_used codes of each codebook (1024: all of them). 64 lets a 2-core
         CPU run learn the copy rule in a minute; the floor is exact for any size (the uniform baseline stays the
         head's: ln 1026 per codebook).

The floor is the conditional entropy of each learnt label given what the model sees when it predicts it: the text
before it and, with the delay pattern, codebook r up to frame t+k-r-1 when it predicts codebook k of frame t (all
of frame t for r < k, frames before t for r = k). The process conditions only on visible values, so:
  audio frame t > 0    H(mixture of "copy frame t-1" and uniform)               (the rest is independent of it)
  audio frame 0        entropy of the predictive over speakers, the posterior given the visible text (tts: the
                       speaker is named), reference clip (clone) and codebooks < k of this frame
  eos of each codebook 0: the clip length is a function of the text, and codebook 0's eos comes first
  text words           ln W each; special tokens, <|eot_id|> after n words (n is in the prompt): 0
Losses are ratios of sums, so the floor is too: summed entropies / learnt labels (per codebook; audio: summed over
codebooks, the run's audio_reduction). floor.json holds it for the val split (what evaluation measures), with the
counts it divides by and the uniform baselines ln(text head size) and K ln(ids per codebook).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SYSTEM = {"tts": "Generate audio following instruction.",
          "clone": "Generate audio following instruction. Speak in the voice of the reference clip.",
          "text": "You are a helpful assistant."}


def mixture_entropy(point_masses: np.ndarray, num_codes: int, noise: float) -> float:
    """Entropy of sum_s w_s [(1 - noise) delta(x = code_s) + noise / num_codes] over x in 0..num_codes-1, with
    `point_masses` = sum of (1 - noise) w_s per distinct code."""
    base = noise / num_codes
    p = point_masses + base
    return float(-(p * np.log(p)).sum() - (num_codes - len(p)) * base * math.log(base))


class Process:
    def __init__(self, params: dict, num_codebooks: int, num_codes: int):
        self.p, self.k = params, num_codebooks
        self.words = params["words"]
        rng = np.random.default_rng([params["seed"], 0])
        used = params["codes_used"]  # per codebook, a seeded subset of the codes (all: the full codebook)
        self.palette = np.stack([np.sort(rng.permutation(num_codes)[:used]) for _ in range(num_codebooks)])
        self.voices = self.palette[np.arange(num_codebooks), rng.integers(0, used, (len(params["speakers"]),
                                                                                   num_codebooks))]
        self.copy_entropy = mixture_entropy(np.array([1.0 - params["frame_noise"]]), used, params["frame_noise"])

    # ---------------------------------------------------------------------------------------------- drawing

    def sentence(self, rng, low_high) -> str:
        n = int(rng.integers(low_high[0], low_high[1] + 1))
        return " ".join(self.words[i] for i in rng.integers(0, len(self.words), n))

    def clip(self, rng, speaker: int, frames: int) -> np.ndarray:
        eps0, eps = self.p["first_frame_noise"], self.p["frame_noise"]
        codes = np.empty((self.k, frames), dtype=np.int64)
        k, used = np.arange(self.k), self.palette.shape[1]
        codes[:, 0] = np.where(rng.random(self.k) < eps0, self.palette[k, rng.integers(0, used, self.k)],
                               self.voices[speaker])
        for t in range(1, frames):
            codes[:, t] = np.where(rng.random(self.k) < eps, self.palette[k, rng.integers(0, used, self.k)],
                                   codes[:, t - 1])
        return codes.astype(np.int16)

    def frames(self, sentence: str) -> int:
        return self.p["frames_per_word"] * len(sentence.split())

    # ---------------------------------------------------------------------------------------------- entropy

    def likelihood(self, codebook: int, code: int) -> np.ndarray:
        """p(frame-0 code of `codebook` | speaker), for every speaker."""
        eps0 = self.p["first_frame_noise"]
        return (1 - eps0) * (self.voices[:, codebook] == code) + eps0 / self.palette.shape[1]

    def clip_scores(self, codes: np.ndarray, posterior: np.ndarray) -> tuple[list[float], list[float]]:
        """Per codebook, over a learnt clip's T + 1 labels (codes, then eos: 0) given the visible past, the speaker
        posterior before its frame 0 being `posterior`: the summed entropy, and the process's own -log p of these
        labels (the realised loss of a perfect model; its expectation is the entropy)."""
        eps0, eps, used = self.p["first_frame_noise"], self.p["frame_noise"], self.palette.shape[1]
        posterior = posterior / posterior.sum()
        entropies, nlls = [], []
        for k in range(self.k):
            masses = {}
            for s, w in enumerate(posterior):
                code = self.voices[s, k]
                masses[code] = masses.get(code, 0.0) + (1 - eps0) * w
            first = mixture_entropy(np.array(list(masses.values())), used, eps0)
            entropies.append(first + (codes.shape[1] - 1) * self.copy_entropy)
            given = self.likelihood(k, int(codes[k, 0]))  # p(this frame-0 code | each speaker)
            same = codes[k, 1:] == codes[k, :-1]
            nlls.append(-math.log(float(posterior @ given))
                        - float(np.log(np.where(same, 1 - eps + eps / used, eps / used)).sum()))
            posterior = posterior * given / float(posterior @ given)  # codebook k of frame 0 is seen next
        return entropies, nlls

    def clip_entropy(self, codes: np.ndarray, posterior: np.ndarray) -> list[float]:
        return self.clip_scores(codes, posterior)[0]

    def sample(self, rng, key: str, kind: str, clip_file) -> tuple[dict, dict]:
        """One ChatML sample and its record: {text: [entropy sum, labels], audio: [[entropy sum, labels] per
        codebook], audio_nll: the process's own -log p of the drawn audio labels per codebook}. (Text needs no
        such sum: every word costs ln W whichever is drawn, so its realised loss is its entropy.)"""
        speaker = int(rng.integers(len(self.p["speakers"])))
        text, audio = [0.0, 0], [[0.0, 0] for _ in range(self.k)]
        audio_nll = [0.0] * self.k

        def learnt_clip(sentence: str, posterior: np.ndarray) -> dict:
            codes = self.clip(rng, speaker, self.frames(sentence))
            for k, (h, nll) in enumerate(zip(*self.clip_scores(codes, posterior))):
                audio[k][0] += h
                audio[k][1] += codes.shape[1] + 1
                audio_nll[k] += nll
            text[1] += 3  # <|audio_out_bos|>, <|audio_eos|>, <|eot_id|>: determined by the prompt and the frames
            return {"type": "audio", "audio_url": clip_file(key, codes)}

        messages = [{"role": "system", "content": SYSTEM[kind]}]
        if kind == "tts":
            sentence = self.sentence(rng, self.p["sentence_words"])
            named = np.eye(len(self.p["speakers"]))[speaker]
            messages += [{"role": "user", "content": f"{self.p['speakers'][speaker]}: {sentence}"},
                         {"role": "assistant", "content": learnt_clip(sentence, named)}]
            out = {"id": key, "messages": messages}
        elif kind == "clone":
            reference = self.sentence(rng, self.p["sentence_words"])
            ref_codes = self.clip(rng, speaker, self.frames(reference))
            posterior = np.ones(len(self.p["speakers"]))  # uniform prior, then what the reference's frame 0 says
            for k in range(self.k):
                posterior = posterior * self.likelihood(k, int(ref_codes[k, 0]))
            messages += [{"role": "user", "content": reference},
                         {"role": "assistant", "content": {"type": "audio",
                                                           "audio_url": clip_file(f"{key}-ref", ref_codes)}}]
            sentence = self.sentence(rng, self.p["sentence_words"])
            messages += [{"role": "user", "content": sentence},
                         {"role": "assistant", "content": learnt_clip(sentence, posterior)}]
            out = {"id": key, "start_index": 3, "messages": messages}
        else:
            answer = self.sentence(rng, self.p["answer_words"])
            n = len(answer.split())
            messages += [{"role": "user", "content": f"Say {n} words."},
                         {"role": "assistant", "content": " " + answer}]  # leading space: one token per word
            text = [n * math.log(len(self.words)), n + 1]  # the words, then <|eot_id|>
            out = {"id": key, "messages": messages}
        return out, {"id": key, "text": text, "audio": audio, "audio_nll": audio_nll}


def floor(records: list[dict], num_codebooks: int, text_head: int, ids_per_codebook: int) -> dict:
    """The loss floor of a set of samples: ratios of summed entropies to learnt labels, as the losses are.

    The floor is an expectation given the samples' prompts. A perfect model's loss on these very samples is the
    process's own -log p of their labels (`process_*`), which scatters about the floor with the standard error
    `*_floor_se`: samples are independent, and each one's realised -log p minus its entropy has mean 0."""
    text = np.sum([r["text"] for r in records], axis=0)
    audio = np.sum([r["audio"] for r in records], axis=0)  # [K, 2]
    per_codebook = audio[:, 0] / audio[:, 1]
    entropy = np.array([[a[0] for a in r["audio"]] for r in records])  # [N, K]
    nll = np.array([r["audio_nll"] for r in records])  # [N, K]
    deviation = ((nll - entropy) / audio[:, 1]).sum(1)  # each sample's share of the summed audio loss
    return {"text_floor": float(text[0] / text[1]), "audio_floor": float(per_codebook.sum()),
            "audio_floor_per_codebook": per_codebook.tolist(),
            # text: the realised loss of a perfect model is the entropy (sample()), so no scatter
            "process_text": float(text[0] / text[1]), "process_audio": float((nll.sum(0) / audio[:, 1]).sum()),
            "text_floor_se": 0.0, "audio_floor_se": float(math.sqrt((deviation ** 2).sum())),
            "uniform_text": math.log(text_head), "uniform_audio": num_codebooks * math.log(ids_per_codebook),
            "text_labels": int(text[1]), "audio_labels": [int(n) for n in audio[:, 1]], "samples": len(records)}


def generate(out: Path, params: dict, model_config: dict) -> dict:
    k, v = model_config["audio_num_codebooks"], model_config["audio_codebook_size"]
    process = Process(params, k, v)
    shutil.rmtree(out / "codes", ignore_errors=True)
    (out / "codes").mkdir(parents=True)

    def clip_file(name: str, codes: np.ndarray) -> str:
        np.save(out / "codes" / f"{name}.npy", codes, allow_pickle=False)
        return f"codes/{name}.npy"

    kinds, weights = zip(*params["mix"].items())
    floors = {}
    for index, split in enumerate(("train", "val")):
        rng = np.random.default_rng([params["seed"], 1 + index])
        lines, records = [], []
        for i in range(params[f"{split}_samples"]):
            kind = kinds[rng.choice(len(kinds), p=np.array(weights) / sum(weights))]
            sample, record = process.sample(rng, f"{split}-{i:06d}-{kind}", kind, clip_file)
            lines.append(json.dumps(sample) + "\n")
            records.append(record)
        (out / f"{split}.jsonl").write_text("".join(lines))
        floors[split] = floor(records, k, model_config["text_config"]["vocab_size"], v + 2)
    result = {**floors["val"], "split": "val", "train": floors["train"]}
    (out / "floor.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--params", type=Path, default=HERE / "params.json")
    parser.add_argument("--model-config", type=Path, default=HERE, help="model config directory or config.json")
    args = parser.parse_args(argv)
    config = args.model_config / "config.json" if args.model_config.is_dir() else args.model_config
    result = generate(args.out, json.loads(args.params.read_text()), json.loads(config.read_text()))
    print(f"{args.out}: floor text {result['text_floor']:.4f} audio {result['audio_floor']:.4f} "
          f"(uniform {result['uniform_text']:.4f} / {result['uniform_audio']:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
