"""Reading what files hold: images, sounds and videos decoded; captions, corpora and pairs."""
