"""The bundled synthetic example: the scene (animal, arena, cameras) and its renderer."""
