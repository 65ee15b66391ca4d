// Key Vault for the SendGrid API key(s), with Azure RBAC authorization (no access policies).
//
// No secret is created here, on purpose: an API key never goes into a template, a parameter file or a deployment
// history. After `azd up` the admin stores it (see docs/deploy.md):
//   az keyvault secret set --vault-name <vault> --name sendgrid-api-key --file <file holding the key>
// The secret name is what a destination's "api_key_secret" names in destinations.json.

param name string
param location string = resourceGroup().location
param tags object = {}

@minValue(7)
@maxValue(90)
param softDeleteRetentionInDays int = 30

@description('Purge protection cannot be turned off again once on; with it, `azd down --purge` cannot free the name.')
param enablePurgeProtection bool = false

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: softDeleteRetentionInDays
    enablePurgeProtection: enablePurgeProtection ? true : null // the service accepts true or nothing, never false
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

output name string = vault.name
output id string = vault.id
output uri string = vault.properties.vaultUri
