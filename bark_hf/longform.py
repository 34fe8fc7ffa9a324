"""Long-form generation: split text into pieces Bark can speak, generate them, join the audio.

One Bark generation reads at most 256 text tokens and speaks at most about 15 s (the semantic
stage stops at 768 tokens). Longer text is cut into sentences, the sentences are grouped into
chunks that fit one generation each, and the chunks' audio is joined with short silences.

The voice stays the same across chunks because each chunk is conditioned on a history: the voice
preset, or without one, the chunk before it (or the first chunk: see `generate_long_form`).
See docs/long-form.md.
"""

from __future__ import annotations

import inspect
import re
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, ProcessorMixin
from transformers.utils import logging

from .checks import checked_flag, checked_seconds, checked_seed, checked_whole_number
from .generation_configuration_bark_hf import BarkHfSemanticGenerationConfig
from .modeling_bark_hf import stage_bars_under_an_outer_bar
from .processing_bark_hf import gives_tokens, normalize_whitespace, validate_voice_preset

logger = logging.get_logger(__name__)

# Speech-duration estimate, per character by script. Rough on purpose: it only has to keep each chunk
# safely below the ~15 s one generation holds. Spaces, digits and punctuation count as Latin characters.
LATIN_CHARS_PER_SECOND = 14.0
"""Alphabetic scripts (Latin, Cyrillic, Greek, ...): about 150 words a minute, spaces included."""
KANA_CHARS_PER_SECOND = 7.0
"""Japanese hiragana and katakana: one mora each."""
SYLLABLE_CHARS_PER_SECOND = 5.0
"""Chinese characters and Korean Hangul syllables: one syllable each."""

DEFAULT_MAX_CHUNK_SECONDS = 10.0
"""Estimated speech per chunk; leaves room under the ~15 s of one generation so a chunk is not cut off."""
MAX_CHUNK_TOKENS = BarkHfSemanticGenerationConfig.max_input_semantic_length
"""Tokenizer tokens per chunk: the semantic stage's text window (256); the processor drops the rest."""
LONG_FORM_MIN_EOS_P = 0.05
"""Semantic `min_eos_p` of the original long-form notebook (default 0.2): stops sooner, less trailing audio."""
DEFAULT_SILENCE_S = 0.25
"""Silence between chunks, as in the original long-form notebook."""
MAX_SILENCE_S = 60.0
"""The longest silence between chunks: far above any pause, and far below what overflows or fills memory."""
DEFAULT_BATCH_SIZE = 8
HISTORY_MODES = ("auto", "first", "previous")
"""What chunks after the first are conditioned on; see `generate_long_form`."""
DEFAULT_HISTORY = "auto"

ABBREVIATIONS = frozenset({
    # English
    "dr", "mr", "mrs", "ms", "prof", "st", "vs", "jr", "sr", "etc", "mt", "gen", "col", "capt", "sgt", "lt", "rev",
    "gov", "sen", "inc", "ltd", "corp", "co", "approx", "dept",
    # Titles and street words of Bark's other languages, mostly followed by a name, which starts with a capital
    "sra", "srta", "sres", "dra", "dña", "avda", "av", "lic", "ing",  # Spanish, Portuguese
    "sig", "sigg", "dott", "avv", "gent",  # Italian
    "mme", "mlle", "mgr", "bd",  # French
    "hr", "fr", "ca", "bzw", "vgl", "evtl", "inkl",  # German
    "ul", "al", "pl", "ks", "inż", "tzw",  # Polish
    "ул", "пр", "пл", "пер", "им", "проф", "акад", "св",  # Russian
    "cad", "sok", "mah", "doç", "yrd",  # Turkish
    "डॉ", "प्रो",  # Hindi (Dr., Prof.)
})
"""Words (lower case, without their period) whose period does not end a sentence; initialisms are found by shape,
and so are single letters and short words before a lower-case word (`_is_abbreviation`)."""
NUMBER_ABBREVIATIONS = frozenset({"no", "nos", "nr", "fig", "figs", "vol", "ch", "pp", "art", "op", "tel", "núm", "pág",
                                  "pag", "godz", "стр", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept",
                                  "oct", "nov", "dec"})
"""Words whose period ends no sentence before a number ("No. 5", "Fig. 3", "Sept. 11"); elsewhere it may ("No. I
won't.")."""
MAX_ORDINAL_DIGITS = 3
"""A number this short before a period is an ordinal or a list number ("am 1. Mai", "2. Close it"); years end."""
MAX_SHORT_ABBREVIATION = 3
"""Letters of a word whose period does not end a sentence before a lower-case word ("usw. und", "np. jabłka")."""

_LATIN_MARKS = ".?!…"
# Marks that end a sentence with or without a space after them: CJK full stops, question and exclamation
# marks (full- and half-width), and Hindi's danda and double danda.
_UNSPACED_MARKS = "。！？．｡।॥"
_OPENERS = "\"'“‘«([{「『（【〈《〔¿¡"
_CLOSERS = "\"'”’»)]}」』）】〉》〕"
# German quotations close with the marks that open English ones: „Hallo.“ and ‚Gut.‘
_GERMAN_CLOSERS = "“‘"
# A run of sentence marks ("?!", "...", "。") and the closing quotes or brackets right after it, or after a
# space a French closing guillemet ("« Oui. »"; a » before a word opens a German quotation instead).
# “ and ‘ close only before a space or the end: in CJK text ”“ closes one quotation and opens the next.
_SENTENCE_END = re.compile(
    f"[{re.escape(_LATIN_MARKS + _UNSPACED_MARKS)}]+"
    f"(?:[{re.escape(_CLOSERS)}]|[{_GERMAN_CLOSERS}](?=[{re.escape(_CLOSERS + _GERMAN_CLOSERS)}]*(?!\\S))| »(?!\\S))*"
)
# Letters in groups of one or two joined by periods, the last period left out: U.S, Ph.D, e.g, a.m, z.B.
_INITIALISM = re.compile(r"[^\W\d_]{1,2}(?:\.[^\W\d_]{1,2})+")
# Bark cues that must not be cut: [laughs], [MAN], and ♪ lyrics ♪ (the latter only into sentences).
_BRACKET_CUE = re.compile(r"\[[^\[\]]*\]")
_CUE = re.compile(rf"{_BRACKET_CUE.pattern}|♪[^♪]*♪")
# Lower-case cues right after a sentence end ("Great. [laughs]") react to that sentence and stay with it;
# upper-case speaker tags ([MAN], [WOMAN]) and ♪ introduce the next one. The first letter class leaves out
# a-z so that an unclosed "[" is read once, not once per lower-case letter after it.
_REACTION_CUES = re.compile(r"(?: ?\[[^\[\]a-z]*[a-z][^\[\]]*\])+")
# Line breaks (a Windows "\r\n" counts once) and what a line that starts a new sentence without an end mark
# begins with: a bullet, a list number ("1." or "2)"), a letter item ("a)"), or an upper-case speaker tag.
_LINE_BREAK = re.compile(r"\r\n|[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")
_NEW_LINE_ITEM = re.compile(r"[-*•‣◦▪●○–—·]\s|\d{1,3}[.)]\s|[^\W\d_]\)\s|\[[^\[\]a-z]*[A-Z][^\[\]a-z]*\]")
# Where an over-long sentence may be cut: after clause marks ("1,000" and "10:30" are not cuts) and after a period
# that `_ends_sentence` passed over ("We were 25. Then ..."), then between words.
_SPACE = re.compile(" ")
_CLAUSE_END = re.compile(r"[,;:.](?=\s)|—|[，、；：]")

Span = tuple[int, int]
"""`(start, end)` of a piece inside the whitespace-normalised text."""


def _normalized_text(text: Any) -> str:
    """`text` with every whitespace run turned into one space; refuses non-strings and empty text."""
    if not isinstance(text, str):
        fix = ("to speak chunks you cut yourself, pass chunks= instead" if isinstance(text, (list, tuple))
               else "convert it with str() first")
        raise TypeError(f"text must be a string; got {type(text).__name__}: {fix}.")
    normalized = normalize_whitespace(text)
    if not normalized:
        raise ValueError("text is empty or whitespace only; pass the words to speak.")
    return normalized


def _normalized_with_breaks(text: Any) -> tuple[str, list[int]]:
    """`_normalized_text(text)` and the positions of its spaces that stand for a break between sentences.

    Normalising turns every line break into a space, so a list or paragraphs without end marks ran on as one
    sentence. A break is a paragraph break (two line breaks, or U+2029), or a line break before a line that
    begins a list item or a speaker tag. A single line break before anything else is only where the text was
    wrapped, and stays a space.
    """
    normalized = _normalized_text(text)
    stripped, breaks, removed = text.strip(), [], 0
    for run in re.finditer(r"\s+", stripped):
        line_breaks = len(_LINE_BREAK.findall(run.group()))
        paragraph = line_breaks >= 2 or "\u2029" in run.group()
        if paragraph or (line_breaks and _NEW_LINE_ITEM.match(stripped, run.end())):
            breaks.append(run.start() - removed)
        removed += len(run.group()) - 1
    return normalized, breaks


def _trimmed(text: str, start: int, end: int) -> Span | None:
    """The span without its outer spaces, or None when nothing is left."""
    while start < end and text[start] == " ":
        start += 1
    while end > start and text[end - 1] == " ":
        end -= 1
    return (start, end) if start < end else None


def _inside(position: int, cues: list[Span]) -> bool:
    """Whether `position` lies strictly inside one of `cues` (in order, not overlapping): a binary search."""
    index = bisect_left(cues, position, key=itemgetter(0)) - 1
    return index >= 0 and position < cues[index][1]


def _word_before(text: str, position: int) -> str:
    """The word of normalised `text` that ends at `position`, without opening quotes or brackets."""
    return text[text.rfind(" ", 0, position) + 1 : position].lstrip(_OPENERS)


def _is_abbreviation(text: str, period: int) -> bool:
    """Whether the period at `period` (a space or the end after it) ends an abbreviation, an initial or an ordinal.

    Listed abbreviations, initialisms and single letters ("J.", "p.", "т.") end no sentence even before a capital
    ("Dr. Who", "the U.S. Navy"): missing a cut is safer than cutting a sentence in two. Nor does a period before a
    lower-case word after a short word, since sentences in cased scripts begin with a capital: "usw. und", "ecc. e",
    "np. jabłka", "vb. aldık" (in text written all in lower case, longer words still end sentences).
    A short number's period is an ordinal's or a list number's ("am 1. Mai", "2. Close it"), unless the number
    follows a number abbreviation ("p. 12.", "No. 5."), where it is a reference that often ends the sentence;
    a number before it is no abbreviation ("1. 2. 3." are list numbers, read without recursing through them).
    """
    word = _word_before(text, period)
    following = text[period + 2 : period + 3]
    if word.lower() in ABBREVIATIONS or _INITIALISM.fullmatch(word) or (len(word) == 1 and word.isalpha()):
        return True
    if word.lower() in NUMBER_ABBREVIATIONS and following.isdigit():
        return True
    if word.isdecimal() and len(word) <= MAX_ORDINAL_DIGITS:
        before = text.rfind(" ", 0, period) - 1  # the last character of the word before, if any
        return not (before > 0 and text[before] == "." and not _word_before(text, before).isdecimal()
                    and _is_abbreviation(text, before))
    return following.islower() and word.isalpha() and len(word) <= MAX_SHORT_ABBREVIATION


def _ends_sentence(text: str, match: re.Match) -> bool:
    """Whether the marks in `match` end a sentence (and are not a number, an abbreviation, an initial...).

    `text` is normalised, so one space at most separates the marks from the next word.
    """
    marks = match.group().rstrip(_CLOSERS + _GERMAN_CLOSERS + " ")
    quoted = marks != match.group()  # the marks end a quotation, which the sentence may go on after
    following = text[match.end() : match.end() + 1]
    if any(mark in _UNSPACED_MARKS for mark in marks):
        # No space needed (CJK text has none between sentences): 「…。」と言った goes on, 「…。」「…」 and 。X do not.
        if quoted:
            return following in ("", " ") or following in _OPENERS
        preceding = text[match.start() - 1 : match.start()]
        return not (marks == "．" and preceding.isdigit() and following.isdigit())
    if following and following != " ":  # "3.5", "v2.0", "e.g.," and "example.com" go on
        return False
    if marks == "." and _is_abbreviation(text, match.start()):
        return False
    if quoted or (marks != "." and set(marks) <= {".", "…"}):
        # After a quotation or an ellipsis, a lower-case word continues the sentence: '"Why?" she asked.'
        return not text[match.end() + 1 : match.end() + 2].islower()
    return True


def _has_words(text: str) -> bool:
    """Whether `text` has something to say or sing, not only `[laughs]`-like cues or punctuation."""
    return re.search(r"\w", _BRACKET_CUE.sub("", text)) is not None


def _sentence_spans(text: str, breaks: Sequence[int] = ()) -> list[Span]:
    """Sentences of normalised `text`, also ended at `breaks` (see `_normalized_with_breaks`) outside cues;
    a piece without words (a lone `[laughs]`) joins its neighbour."""
    cues = [match.span() for match in _CUE.finditer(text)]
    ends = [
        (_REACTION_CUES.match(text, match.end()) or match).end()
        for match in _SENTENCE_END.finditer(text)
        if not _inside(match.start(), cues) and _ends_sentence(text, match)
    ]
    ends += [position for position in breaks if not _inside(position, cues)]
    spans, start = [], 0
    for end in sorted(ends):
        if end > start:
            spans.append(_trimmed(text, start, end))
            start = end
    spans.append(_trimmed(text, start, len(text)))
    merged: list[Span] = []
    for span in filter(None, spans):
        if merged and not (_has_words(text[slice(*span)]) and _has_words(text[slice(*merged[-1])])):
            merged[-1] = (merged[-1][0], span[1])
        else:
            merged.append(span)
    return merged


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, whitespace normalised, none empty.

    Ends at `.`, `?`, `!`, `…` and "..." followed by a space (closing quotes and brackets stay with
    the sentence, French "« Oui. »" and German "„Hallo.“" too), and at `。！？．｡` and Hindi's `।` and `॥`
    without one; also at a paragraph break, and at a line break before a list item or a speaker tag
    (`_normalized_with_breaks`).
    Does not end after abbreviations (`ABBREVIATIONS`; `NUMBER_ABBREVIATIONS` before a number), initialisms
    ("U.S.", "Ph.D.", "e.g."), single letters ("J. R. R.", "p. 12") or ordinals ("am 1. Mai"), even before a
    capitalised word, nor after a short word before a lower-case one ("usw. und"); see `_is_abbreviation`;
    nor inside numbers ("3.5", "v2.0"),
    at an ellipsis or a closing quote followed by a lower-case word (or, in CJK text, by any word), or
    inside Bark cues (`[laughs]`, `♪ ... ♪`). Cues stay with their sentence:
    `[laughs]` right after a sentence end belongs to that sentence, `[MAN]` and `♪` to the next.
    """
    normalized, breaks = _normalized_with_breaks(text)
    return [normalized[start:end] for start, end in _sentence_spans(normalized, breaks)]


def checked_silence(value: Any, name: str) -> float:
    """`value` as seconds of silence in [0, MAX_SILENCE_S]: a huge one (1e308) failed when the chunks were joined,
    after the whole generation."""
    seconds = checked_seconds(value, name)
    if seconds > MAX_SILENCE_S:
        raise ValueError(f"{name} must be at most {MAX_SILENCE_S:g} seconds; got {value!r}.")
    return seconds


def checked_history(value: Any, name: str) -> str:
    """`value` as one of `HISTORY_MODES`."""
    if not isinstance(value, str) or value not in HISTORY_MODES:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, HISTORY_MODES))} (what long-form chunks are "
                         f"conditioned on); got {value!r}.")
    return value


def _chars_per_second(char: str) -> float:
    code = ord(char)
    if 0x3040 <= code <= 0x30FF or 0x31F0 <= code <= 0x31FF or 0xFF66 <= code <= 0xFF9D:  # kana
        return KANA_CHARS_PER_SECOND
    if (
        0x4E00 <= code <= 0x9FFF  # CJK unified ideographs
        or 0x3400 <= code <= 0x4DBF  # extension A
        or 0x20000 <= code <= 0x3FFFF  # extensions B and later
        or 0xF900 <= code <= 0xFAFF  # compatibility ideographs
        or 0xAC00 <= code <= 0xD7A3  # Hangul syllables
        or 0x1100 <= code <= 0x11FF  # Hangul jamo
        or 0x3130 <= code <= 0x318F  # Hangul compatibility jamo
    ):
        return SYLLABLE_CHARS_PER_SECOND
    return LATIN_CHARS_PER_SECOND


def estimate_speech_seconds(text: str) -> float:
    """A rough spoken duration of `text`: each character costs 1 / (its script's characters per second)."""
    return sum(1.0 / _chars_per_second(char) for char in text)


def _fits_budget(tokenizer: Any, max_seconds: float, max_tokens: int) -> Callable[[str], bool]:
    """A test of whether a piece fits one generation: estimated duration and, with a tokenizer, token count."""

    def fits(piece: str) -> bool:
        if estimate_speech_seconds(piece) > max_seconds:
            return False
        # The processor's tokenisation: whitespace is already normalised, no special tokens.
        return tokenizer is None or len(tokenizer.encode(piece, add_special_tokens=False)) <= max_tokens

    return fits


def _cut_spans(text: str, span: Span, boundary: re.Pattern) -> list[Span]:
    """`span` cut after every match of `boundary` outside `[...]` cues, trimmed, none empty."""
    start, end = span
    cues = [match.span() for match in _BRACKET_CUE.finditer(text, start, end)]
    pieces, piece_start = [], start
    for match in boundary.finditer(text, start, end):
        if not _inside(match.start(), cues):
            pieces.append(_trimmed(text, piece_start, match.end()))
            piece_start = match.end()
    pieces.append(_trimmed(text, piece_start, end))
    return [piece for piece in pieces if piece is not None]


def _pack(text: str, spans: list[Span], fits: Callable[[str], bool]) -> list[Span]:
    """Merge neighbouring spans greedily while the merged text still fits."""
    packed = spans[:1]
    for start, end in spans[1:]:
        if fits(text[packed[-1][0] : end]):
            packed[-1] = (packed[-1][0], end)
        else:
            packed.append((start, end))
    return packed


def _longest_fitting_stop(text: str, start: int, end: int, fits: Callable[[str], bool]) -> int:
    """The largest stop in (start, end] with `text[start:stop]` fitting, or start + 1 when none fits.

    The prefix's length is doubled until it no longer fits, then bisected: finding it costs about its own
    length, not the rest of the text's (a 40,000-character word took seconds, quadratic in its length).
    """
    low, high = start + 1, end  # the longest fitting stop lies in [low, high]
    while low < high:
        probe = min(high, 2 * low - start)
        if not fits(text[start:probe]):
            high = probe - 1
            break
        low = probe
    while low < high:
        middle = (low + high + 1) // 2
        if fits(text[start:middle]):
            low = middle
        else:
            high = middle - 1
    return low


def _cut_between_words(text: str, span: Span, fits: Callable[[str], bool]) -> list[Span]:
    """`span` cut into the longest pieces that fit, between words (a `[...]` cue counts as one word).

    A piece ends at the last space in it, unless the word across the cut is longer than a chunk itself (CJK
    text without spaces, a long URL): that word is cut anyway, so the piece is filled up to where it is full.
    Cutting words apart first and packing them again left the word or `[WOMAN]` tag before such a run alone.
    """
    start, end = span
    cues = [match.span() for match in _BRACKET_CUE.finditer(text, start, end)]
    spaces = [match.start() for match in _SPACE.finditer(text, start, end) if not _inside(match.start(), cues)]
    pieces = []
    while start < end:
        if text[start] == " ":
            start += 1
            continue
        stop = _longest_fitting_stop(text, start, end, fits)
        index = bisect_left(spaces, stop + 1) - 1  # the last space at or before stop
        if stop < end and index >= 0 and spaces[index] > start:
            word_end = spaces[index + 1] if index + 1 < len(spaces) else end
            if fits(text[spaces[index] + 1 : word_end]):
                stop = spaces[index]
        piece = _trimmed(text, start, stop)
        if piece is not None:
            pieces.append(piece)
        start = stop
    return pieces


def _fitting_spans(text: str, span: Span, fits: Callable[[str], bool]) -> list[Span]:
    """`span` as pieces that fit: cut at clause marks, then between words, then anywhere; packed again."""
    if fits(text[slice(*span)]):
        return [span]
    pieces = [
        piece
        for part in _cut_spans(text, span, _CLAUSE_END)
        for piece in ([part] if fits(text[slice(*part)]) else _cut_between_words(text, part, fits))
    ]
    return _pack(text, pieces, fits)


def chunk_text(
    text: str,
    tokenizer: Any = None,
    max_seconds: float = DEFAULT_MAX_CHUNK_SECONDS,
    max_tokens: int = MAX_CHUNK_TOKENS,
) -> list[str]:
    """Group the sentences of `text` into chunks that each fit one generation.

    A chunk's estimated speech (`estimate_speech_seconds`) is at most `max_seconds`, and with a
    `tokenizer` (or a `BarkHfProcessor`) it is at most `max_tokens` tokens as the processor
    tokenises it. Sentences are packed greedily in order; a sentence over budget is cut at clause
    marks (`,;:—，、；：` and a period that ended no sentence), then between words, then anywhere
    (`_cut_between_words`).
    """
    normalized, breaks = _normalized_with_breaks(text)
    max_seconds = checked_seconds(max_seconds, "max_seconds", allow_zero=False)
    max_tokens = checked_whole_number(max_tokens, "max_tokens")
    if max_tokens > MAX_CHUNK_TOKENS:  # else each chunk's end past the window was dropped at generation
        raise ValueError(f"max_tokens must be at most {MAX_CHUNK_TOKENS}, the text tokens one Bark generation reads "
                         f"(the processor drops the rest); got {max_tokens}.")
    if isinstance(tokenizer, ProcessorMixin):
        tokenizer = tokenizer.tokenizer
    if tokenizer is not None and not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(
            f"tokenizer must be a transformers tokenizer, a BarkHfProcessor or None; got {type(tokenizer).__name__}."
        )
    fits = _fits_budget(tokenizer, max_seconds, max_tokens)
    pieces = [piece for span in _sentence_spans(normalized, breaks) for piece in _fitting_spans(normalized, span, fits)]
    return [normalized[start:end] for start, end in _pack(normalized, pieces, fits)]


def needs_long_form(text: str, tokenizer: Any = None) -> bool:
    """Whether `text` is more than one generation holds, i.e. `chunk_text` gives more than one chunk."""
    return len(chunk_text(text, tokenizer)) > 1


def join_with_silence(audios: Sequence[np.ndarray], silence_samples: int) -> np.ndarray:
    """The chunks' audio in order as one float32 array, `silence_samples` zeros between each two."""
    silence = np.zeros(silence_samples, dtype=np.float32)
    joined = [audios[0]]
    for audio in audios[1:]:
        joined += [silence, audio]
    return np.concatenate(joined).astype(np.float32)


@dataclass
class LongFormOutput:
    """The joined audio of a long text and what each chunk produced."""

    audio: np.ndarray  # [samples] float32: chunks in order, silence between them
    sampling_rate: int
    chunks: list[str]  # the text of each chunk, as generated
    chunk_lengths: list[int]  # samples of each chunk's audio, silence not counted
    # Per chunk: semantic_prompt [n], coarse_prompt [2, m], fine_prompt [8, m] int64 (usable as a voice preset).
    generations: list[dict[str, np.ndarray]]


# Arguments of `model.generate` that generate_long_form and the pipeline set from their own arguments.
_SET_FROM_CALL_ARGUMENTS = ("input_ids", "attention_mask", "history_prompt", "return_dict_in_generate",
                            "show_progress")


def _checked_chunks(chunks: Any) -> list[str]:
    if isinstance(chunks, str) or not isinstance(chunks, Sequence):
        raise TypeError(f"chunks must be a list of strings; got {type(chunks).__name__}. Pass text= to split text.")
    if not chunks:
        raise ValueError("chunks is an empty list; pass at least one piece of text.")
    checked = []
    for index, chunk in enumerate(chunks):
        if not isinstance(chunk, str):
            raise TypeError(f"chunks[{index}] is a {type(chunk).__name__}; pass strings only.")
        if not chunk.strip():
            raise ValueError(f"chunks[{index}] is empty or whitespace only; remove it or give it words.")
        checked.append(normalize_whitespace(chunk))
    return checked


def _check_readable(pieces: list[str], tokenizer: Any, own_chunks: bool) -> None:
    """Refuse a piece that gives no tokens before anything is generated: the processor found it only when its
    batch came up, after the earlier chunks' work, and named it by its row in that batch ("text[0]")."""
    for index, piece in enumerate(pieces):
        if not gives_tokens(tokenizer, piece):
            where = f"chunks[{index}]" if own_chunks else f"Chunk {index} of the text"
            raise ValueError(f"{where} ({piece!r}) gives no tokens; give it words to speak, or remove it.")


def checked_generate_kwargs(generate_kwargs: Mapping[str, Any] | None, model: Any) -> dict[str, Any]:
    """The caller's `model.generate` settings, checked before anything is generated: those set from other
    arguments are refused, and so are stage settings that the stage's generation config refuses (the one they
    pass as `generation_config`, else the model's, as `generate` reads them)."""
    if generate_kwargs is None:
        return {}
    if not isinstance(generate_kwargs, Mapping):
        raise TypeError(f"generate_kwargs must be a dict of stage settings; got {type(generate_kwargs).__name__}.")
    reserved = [name for name in _SET_FROM_CALL_ARGUMENTS if name in generate_kwargs]
    if reserved:
        raise ValueError(
            f"generate_kwargs may not set {', '.join(reserved)}: they come from the call's own arguments. Pass the "
            "voice as voice_preset= and progress bars as show_progress=."
        )
    own = inspect.signature(type(model).generate).parameters  # use_cache, compile, ...; the rest are stages'
    model.split_stage_settings({name: value for name, value in generate_kwargs.items() if name not in own},
                               generate_kwargs.get("generation_config"))
    return dict(generate_kwargs)


def _stage_settings(generate_kwargs: Mapping[str, Any] | None, model: Any) -> dict[str, Any]:
    """The caller's stage settings on top of the long-form default `semantic_min_eos_p`."""
    return {"semantic_min_eos_p": LONG_FORM_MIN_EOS_P, **checked_generate_kwargs(generate_kwargs, model)}


def _full_generation(output: Any, row: int) -> dict[str, np.ndarray]:
    """One item's tokens of every stage, trimmed to its lengths, in the layout of a voice preset."""
    tokens = {
        "semantic_prompt": output.semantic_tokens[row, : int(output.semantic_lengths[row])],
        "coarse_prompt": output.coarse_tokens[row, :, : int(output.coarse_lengths[row])],
        "fine_prompt": output.fine_tokens[row, :, : int(output.fine_lengths[row])],
    }
    return {key: value.cpu().numpy().astype(np.int64) for key, value in tokens.items()}


def _usable_history(generation: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray] | None:
    """`generation` as a voice history, or None (with a warning) when it is too short to be one."""
    try:
        return validate_voice_preset(generation)
    except ValueError as error:
        logger.warning(f"Chunk {index}'s generation cannot serve as the voice history of later chunks, skipping it: "
                       f"{error}")
        return None


def _check_model_and_processor(model: Any, processor: Any) -> None:
    """Refuse a stage model or a tokenizer in place of the whole model and its processor (chunk_text takes either a
    tokenizer or a processor): they failed with an AttributeError, deep inside transformers for a tokenizer. Duck
    typed, as remote code can load these classes as copies of bark_hf's."""
    if not hasattr(model, "split_stage_settings"):
        raise TypeError(f"model must be the whole BarkHfModel (text to audio), got {type(model).__name__}; load it "
                        "with BarkHfModel.from_pretrained(folder).")
    if not hasattr(processor, "load_voice_preset"):
        raise TypeError(f"processor must be a BarkHfProcessor (tokenizer and voice presets), got "
                        f"{type(processor).__name__}; load it with BarkHfProcessor.from_pretrained(folder).")


def generate_long_form(
    model: Any,
    processor: Any,
    text: str | None = None,
    *,
    chunks: list[str] | None = None,
    voice_preset: Any = None,
    history: str = DEFAULT_HISTORY,
    silence_s: float = DEFAULT_SILENCE_S,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int | None = None,
    generate_kwargs: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> LongFormOutput:
    """Speak text of any length: chunk it, generate every chunk in one voice, join the audio.

    Pass `text` (split with `chunk_text`) or your own `chunks`, not both. `voice_preset` is
    anything the processor accepts (name, `.npz` path, dict of arrays). `history` picks what the
    chunks are conditioned on:

    - `"auto"` (default): with a preset, every chunk uses it, batched by `batch_size`; without one,
      each chunk continues the one before it, one at a time.
    - `"first"`: as `"auto"` with a preset; without one, the first chunk is generated alone and its
      full generation is the history of all the others, which then batch.
    - `"previous"`: each chunk continues the one before it (the first uses the preset, if any),
      as feeding the original's `generate_audio(..., output_full=True)` back in does. Sequential.

    A generation too short to be a valid preset is skipped as a history (with a warning).
    `generate_kwargs` are `model.generate`'s prefixed stage settings (`semantic_temperature=...`);
    `semantic_min_eos_p` defaults to `LONG_FORM_MIN_EOS_P`. `seed` seeds torch once before the
    first generation. The audio is the chunks joined with `silence_s` seconds of zeros between them.
    """
    if (text is None) == (chunks is None):
        raise ValueError("Pass exactly one of text= (split into chunks here) or chunks= (your own, used as given).")
    _check_model_and_processor(model, processor)
    history = checked_history(history, "history")
    silence_s = checked_silence(silence_s, "silence_s")
    batch_size = checked_whole_number(batch_size, "batch_size")
    seed = checked_seed(seed)
    show_progress = checked_flag(show_progress, "show_progress")
    pieces = chunk_text(text, processor.tokenizer) if chunks is None else _checked_chunks(chunks)
    _check_readable(pieces, processor.tokenizer, own_chunks=chunks is not None)
    settings = _stage_settings(generate_kwargs, model)
    voice = None if voice_preset is None else processor.load_voice_preset(voice_preset)

    audios: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(pieces)
    generations: list[dict[str, np.ndarray]] = [{}] * len(pieces)

    def generate(indices: list[int], history_prompt: dict[str, np.ndarray] | None) -> None:
        presets = None if history_prompt is None else [history_prompt] * len(indices)
        inputs = processor([pieces[index] for index in indices], voice_preset=presets)
        # Each stage's bar too: a batch of chunks can run for minutes with the chunk bar standing still.
        with stage_bars_under_an_outer_bar():
            output = model.generate(**inputs, return_dict_in_generate=True, show_progress=show_progress, **settings)
        for row, index in enumerate(indices):
            audios[index] = output.audio[row, : int(output.audio_lengths[row])].float().cpu().numpy()
            generations[index] = _full_generation(output, row)
        progress.update(len(indices))

    if seed is not None:
        torch.manual_seed(seed)
    with logging.tqdm(total=len(pieces), desc="long-form", unit="chunk", disable=not show_progress) as progress:
        if history == "previous" or (history == "auto" and voice is None):
            for index in range(len(pieces)):
                generate([index], voice)
                voice = _usable_history(generations[index], index) or voice
        else:
            start = 0
            while voice is None and start < len(pieces):  # no preset: the first usable generation is the voice
                generate([start], None)
                voice = _usable_history(generations[start], start)
                start += 1
            for batch_start in range(start, len(pieces), batch_size):
                generate(list(range(batch_start, min(batch_start + batch_size, len(pieces)))), voice)

    return LongFormOutput(
        audio=join_with_silence(audios, round(silence_s * model.sampling_rate)),
        sampling_rate=model.sampling_rate,
        chunks=pieces,
        chunk_lengths=[audio.shape[0] for audio in audios],
        generations=generations,
    )


__all__ = [
    "DEFAULT_MAX_CHUNK_SECONDS",
    "LONG_FORM_MIN_EOS_P",
    "MAX_CHUNK_TOKENS",
    "LongFormOutput",
    "chunk_text",
    "estimate_speech_seconds",
    "generate_long_form",
    "needs_long_form",
    "split_sentences",
]
