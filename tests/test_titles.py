from ilora_cli.data.titles import clean_title, disambiguate, movie_title


def test_movie_titles():
    assert movie_title("Toy Story (1995)") == ("Toy Story", "1995")
    assert movie_title("Usual Suspects, The (1995)") == ("The Usual Suspects", "1995")
    assert movie_title("unknown") == ("unknown", None)
    assert movie_title("Jungle2Jungle (1997)")[0] == "Jungle2Jungle"
    assert movie_title("Aladdin and the King of Thieves (1996)")[0] == "Aladdin and the King of Thieves"
    assert movie_title("Wrong Trousers, The (1993)")[0] == "The Wrong Trousers"
    assert movie_title("City of Lost Children, The (Cité des enfants perdus, La) (1995)")[0] == (
        "The City of Lost Children (Cité des enfants perdus, La)"
    )
    title, year = movie_title("Great Day in Harlem, A (1994)")
    assert (title, year) == ("A Great Day in Harlem", "1994")
    assert movie_title("Robin Hood: Men in Tights (V) (1993)")[0] == "Robin Hood: Men in Tights (V)"


def test_clean_title_whitespace_and_controls():
    assert clean_title("  Café\tDel  Mar\x00 ") == "Café Del Mar"


def test_disambiguate_with_and_without_hints():
    assert disambiguate(["Hamlet", "Hamlet", "Other"], ["1996", "1990", None]) == [
        "Hamlet (1996)",
        "Hamlet (1990)",
        "Other",
    ]
    assert disambiguate(["X", "x", "X"]) == ["X", "x #2", "X #3"]
    # same hints cannot separate them → numbered
    out = disambiguate(["Y", "Y"], ["1999", "1999"])
    assert len({t.casefold() for t in out}) == 2
    # a numbered suffix never collides with an existing title
    out = disambiguate(["Z", "Z", "Z #2"])
    assert len({t.casefold() for t in out}) == 3


def test_disambiguate_uses_hints_that_are_unique_within_the_group():
    out = disambiguate(["Cat", "Cat", "Cat"], ["1965", "1997", "1997"])
    assert out == ["Cat (1965)", "Cat", "Cat #2"]
