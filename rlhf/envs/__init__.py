"""Multi-turn environments: the interface (`interface`), the token-in-token-out episode runner
(`episodes`, `turns`), credit over agent tokens (`credit`, pure torch), and two built-in environments
with an exact true objective (`calculator`, `guess_number`)."""
