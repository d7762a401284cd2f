from services.detokenizer.service import DetokenizerService
from shared.actor import main

if __name__ == "__main__":
    main(DetokenizerService)
