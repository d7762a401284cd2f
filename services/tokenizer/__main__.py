from services.tokenizer.service import TokenizerService
from shared.actor import main

if __name__ == "__main__":
    main(TokenizerService)
