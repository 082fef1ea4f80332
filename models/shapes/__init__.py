"""The "shapes" family: procedural 64×64 scenes of coloured shapes, and a scorer that reads them back.

:mod:`models.shapes.scenes` draws scenes, captions and conditioning images (scribble, edges, inpainting
mask, low-resolution copy); :mod:`models.shapes.scorer` measures what a (possibly blurry) image shows.
"""
