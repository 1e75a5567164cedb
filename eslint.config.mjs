// ESLint flat config: typescript-eslint's recommended rules for the program and tests.
import eslint from "@eslint/js";
import tseslint from "typescript-eslint";

export default tseslint.config(
  { ignores: ["node_modules/", "policy/node_modules/", "bin/", ".cache/", ".work/", "**/*.js", "**/*.mjs"] },
  eslint.configs.recommended,
  ...tseslint.configs.recommended,
  {
    rules: {
      "@typescript-eslint/no-explicit-any": "off",
      "@typescript-eslint/no-unused-vars": ["error", { argsIgnorePattern: "^_" }],
      // Tests strip ANSI escapes from serial consoles.
      "no-control-regex": "off",
    },
  },
);
