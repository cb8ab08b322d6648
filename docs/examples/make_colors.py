"""Writes docs/examples/colors.jsonl: activation records of a made-up "color words" feature.

The worked example of docs/own_feature.md. Real SAE dumps come from a model's SAE; this file is
constructed by hand so its meaning is known: the feature fires (activation 1.5-6) on color words
and stays at 0 elsewhere, except for a weak echo (0.1-0.4) on the word after a color, as real
features often leak onto their neighbours. The echo is why the example run sets
``feature.threshold=0.5``. A third of the texts have no color at all but similar words in the
same places (sizes, materials, objects), so the labeler cannot win by "adjective" or "noun".

Tokens are split the way GPT-style tokenizers pre-split text (a leading space stays with the
word), so they concatenate exactly to the text, as the records format requires; they are not
SmolLM2's tokens, which the loader aligns by character offsets.

    python docs/examples/make_colors.py    # deterministic: rewrites the committed file as is
"""

import json
import os
import random
import re

# [word] marks where the feature fires.
TEXTS = (
    'She painted the kitchen door [red] last summer.',
    'The sky turned a deep [blue] after the storm.',
    'He wore a [green] jacket to the interview.',
    'The [yellow] taxi waited outside the station.',
    'Her scarf was [purple] with thin [white] stripes.',
    'We bought [orange] curtains for the living room.',
    'The baby slept under a soft [pink] blanket.',
    'His old boots were [brown] and covered in mud.',
    'A [black] cat crossed the road in front of us.',
    'The walls of the hospital were plain [white].',
    'Clouds hung low and [gray] over the harbor.',
    'The flag has three stripes: [red], [white] and [blue].',
    'She chose a [violet] dress for the wedding.',
    'The leaves turn [golden] and then [brown] in autumn.',
    'Mix [blue] and [yellow] paint to get [green].',
    'The teacher marked the mistakes in [red] ink.',
    'A [turquoise] sea stretched to the horizon.',
    'The car was a shiny [silver] sedan.',
    'Ripe tomatoes are bright [red] and firm.',
    'He dyed his hair [blue] for the concert.',
    'The [white] house at the corner is for sale.',
    'Her eyes were a striking shade of [green].',
    'They painted the fence [black] to match the gate.',
    'The sunset left the hills [pink] and [orange].',
    'A [gray] wolf howled somewhere in the valley.',
    'The logo is a [yellow] circle on a [blue] background.',
    'He keeps his notes in a [brown] leather folder.',
    'The bride carried [white] roses and [purple] lilies.',
    'Traffic stopped when the light turned [red].',
    'The bathroom tiles are pale [green].',
    'She drew the river in [blue] crayon.',
    'The old photograph had faded to [brown] and [yellow].',
    'Wear something [black] to the ceremony.',
    'The frog on the leaf was tiny and [green].',
    'Snow covered the field in a thick [white] layer.',
    'The [orange] pumpkin sat on the porch.',
    'His tie was [red] with small [gray] dots.',
    'The ink had dried to a dull [purple].',
    'A [pink] flamingo stood on one leg.',
    'Coffee stained the [white] tablecloth.',
    'The kitchen door was painted last summer.',
    'He wore a wool jacket to the interview.',
    'The old taxi waited outside the station.',
    'We bought heavy curtains for the living room.',
    'The baby slept under a soft wool blanket.',
    'His old boots were worn and covered in mud.',
    'A small cat crossed the road in front of us.',
    'The walls of the hospital were plain and bare.',
    'Clouds hung low and heavy over the harbor.',
    'She chose a long dress for the wedding.',
    'The leaves fall and rot in the autumn rain.',
    'The teacher marked the mistakes in pencil.',
    'A calm sea stretched to the horizon.',
    'The car was a shiny new sedan.',
    'Ripe tomatoes are sweet and firm.',
    'The wooden house at the corner is for sale.',
    'They repaired the fence to match the gate.',
    'He keeps his notes in a leather folder.',
    'The bride carried roses and lilies.',
    'The frog on the leaf was tiny and wet.',
)

# The words the feature fires on.
COLORS = frozenset(w.lower() for t in TEXTS for w in re.findall(r'\[(\w+)\]', t))
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'colors.jsonl')
PIECES = re.compile(r'\s?\w+|\s?[^\w\s]+|\s+')


def record(marked: str, rng: random.Random) -> dict:
  text = marked.replace('[', '').replace(']', '')
  fires = []  # character spans of the marked words in the unmarked text
  for m in re.finditer(r'\[(\w+)\]', marked):
    start = m.start() - 2 * len(fires)  # each earlier mark removed two bracket characters
    fires.append((start, start + len(m.group(1))))
  tokens, acts, echo, offset = [], [], False, 0
  for piece in PIECES.findall(text):
    s, e = offset, offset + len(piece)
    offset = e
    tokens.append(piece)
    if any(s < fe and fs < e for fs, fe in fires):
      acts.append(round(rng.uniform(1.5, 6.0), 2))
      echo = True
    elif echo and piece.strip().isalpha():  # the weak echo on the next word
      acts.append(round(rng.uniform(0.1, 0.4), 2))
      echo = False
    else:
      acts.append(0.0)
      echo = echo and not piece.strip()
  assert ''.join(tokens) == text
  return {'feature_id': 'colors', 'text': text, 'tokens': tokens, 'activations': acts}


def main():
  rng = random.Random(0)
  with open(OUT, 'w', encoding='utf-8') as f:
    for marked in TEXTS:
      f.write(json.dumps(record(marked, rng), ensure_ascii=False) + '\n')
  print(f'Wrote {len(TEXTS)} records to {OUT}')


if __name__ == '__main__':
  main()
